"""``gsa serve [MODEL]``: the OpenAI-compatible server, on uvicorn.

Why everything is checked before the model loads: a bad option, a missing API key for a public bind or
a port in use is one message and exit status 2 at once, not after a model load. The model is resolved
exactly as ``gsa chat`` resolves it (``gsa_chat.models.load_chat_model``: a folder, a hub name, or the
embedded default when MODEL is left out). The listening socket is bound here and handed to uvicorn, so
``--port 0`` works (the chosen port is printed) and no other process can take the port in between.

SIGTERM (and Ctrl+C) stops accepting connections, lets running streams finish for up to
``--grace-period`` seconds, stops the engine and exits with status 0 (Ctrl+C: 130).
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from gsa_core.errors import GSAError

API_KEY_ENV = "GSA_API_KEY"


class ServeError(GSAError):
    """A ``gsa serve`` option that cannot work (a public bind without a key, a port in use, a bad value)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="a folder saved with save_pretrained (model + tokenizer; GSA checkpoints too) or a hub "
                             "name; default: the embedded reference model, as gsa chat (trained on first use)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; any other than loopback needs --api-key)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every request but /health "
                             f"(default: ${API_KEY_ENV})")
    parser.add_argument("--model-name", default=None,
                        help="the model id clients send (default: the model folder's name, or the hub name)")
    parser.add_argument("--template", default="auto",
                        help="chat prompt template: auto (default), plain, tinystories-instruct, chat-template")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-sessions", type=int, default=16, help="sessions decoding at once (default 16)")
    limits.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for a session slot; beyond it: 429 (default 64)")
    limits.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="tokens of one prompt (default: the model's positions, at most 8192)")
    limits.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens a request may ask (4096)")
    limits.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward (512)")
    limits.add_argument("--prefix-cache-mib", type=float, default=256.0,
                        help="bytes of states kept after conversation prefixes, in MiB (default 256; 0: off)")
    parser.add_argument("--grace-period", type=float, default=30.0,
                        help="seconds SIGTERM waits for running streams before cancelling them (default 30)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    parser.add_argument("--log-json", action="store_true", help="one JSON line per request on stdout")
    parser.add_argument("--store", action="store_true",
                        help="keep served chat conversations in the chat database (gsa logs shows them)")
    parser.set_defaults(handler=run)


# ----------------------------------------------------------------------------- checks
def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_key(args: argparse.Namespace) -> str | None:
    """``--api-key`` or ``$GSA_API_KEY``; required when binding beyond loopback."""
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ServeError(f"the API key is empty (--api-key or {API_KEY_ENV}); give a non-empty key or none")
    if key is None and not is_loopback(args.host):
        raise ServeError(f"--host {args.host} accepts connections from other machines, so it needs an API key: pass "
                         f"--api-key KEY or set {API_KEY_ENV} (clients then send 'Authorization: Bearer KEY'), or bind "
                         "to 127.0.0.1")
    return key


def limits_from(args: argparse.Namespace, max_positions: int | None) -> Any:
    from pydantic import ValidationError

    from gsa_serve.limits import Limits

    prompt = args.max_prompt_tokens
    if prompt is None:
        prompt = min(8192, max_positions - 1) if max_positions else 8192
    values = {"max_sessions": args.max_sessions, "max_queue": args.max_queue, "max_prompt_tokens": prompt,
              "max_tokens": args.max_tokens, "prefill_chunk": args.prefill_chunk}
    try:
        return Limits(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0])
        field = Limits.model_fields[name]
        raise ServeError(f"--{name.replace('_', '-')} {values[name]}: {first['msg'].lower()} ({field.description})"
                         ) from None


def check_options(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ServeError(f"--port {args.port} is not a port; give 0 to 65535 (0: any free port)")
    if not 0 <= args.grace_period <= 3600:
        raise ServeError(f"--grace-period {args.grace_period}: give 0 to 3600 seconds")
    if not 0 <= args.prefix_cache_mib <= 1 << 20:
        raise ServeError(f"--prefix-cache-mib {args.prefix_cache_mib}: give 0 (off) to {1 << 20} MiB")
    if not 0 <= args.threads <= 1024:
        raise ServeError(f"--threads {args.threads}: give 0 (torch's default) to 1024")
    limits_from(args, None)
    from gsa_chat.templates import get_template

    if args.template != "auto":
        get_template(args.template)  # an unknown name lists the valid ones


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (IPv4 or IPv6), or one clear error (in use, not an address of this machine)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise ServeError(f"--host {host}: not an address this machine can listen on ({exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "the port is in use (pick another with --port, or 0 for any free one)" \
            if exc.errno in (98, 48, 10048) else exc.strerror or str(exc)
        raise ServeError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def model_id(args: argparse.Namespace, name: str) -> str:
    if args.model_name:
        return str(args.model_name)
    path = Path(name)
    return path.name if path.is_dir() else name


# ----------------------------------------------------------------------------- running
def run(args: argparse.Namespace) -> int:
    check_options(args)
    key = api_key(args)
    sock = bind(args.host, args.port)
    try:
        return _serve(args, key, sock)
    finally:
        sock.close()


def _serve(args: argparse.Namespace, key: str | None, sock: socket.socket) -> int:
    import torch
    import uvicorn
    from gsa_chat.models import load_chat_model
    from gsa_chat.templates import resolve_template

    from gsa_serve.app import create_app
    from gsa_serve.engine import Engine
    from gsa_serve.prefix_cache import PrefixCache
    from gsa_serve.runners import runner_for
    from gsa_serve.service import Server

    if args.threads:
        torch.set_num_threads(args.threads)
    store = None
    if args.store:
        from gsa_chat.store import Store

        store = Store()  # opened now: a damaged or foreign database is one message before the model loads
    chat_model = load_chat_model(args.model)
    template = resolve_template(args.template, chat_model.tokenizer, chat_model.name)
    runner = runner_for(chat_model.model)
    limits = limits_from(args, runner.max_positions)
    served = model_id(args, chat_model.name)
    identity = hashlib.sha256(f"{chat_model.name}\0{chat_model.model.config.to_json_string()}".encode()).hexdigest()
    cache = PrefixCache(int(args.prefix_cache_mib * (1 << 20)), identity) if args.prefix_cache_mib > 0 else None
    engine = Engine(runner, chat_model.tokenizer, limits=limits, prefix_cache=cache)
    sessions = None
    if store is not None:
        from gsa_serve.sessions import SessionRecorder

        sessions = SessionRecorder(store, chat_model.name, template.name)
    server = Server(engine, chat_model.tokenizer, template, served, api_key=key,
                    log_stream=sys.stdout if args.log_json else None, sessions=sessions)
    config = uvicorn.Config(create_app(server), log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=round(args.grace_period), timeout_keep_alive=5)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in str(host) else host
    print(f"gsa serve: {served} ({runner.describe()}, template {template.name}) listening on http://{shown}:{port}/v1 "
          f"({limits.max_sessions} session slots, queue {limits.max_queue}"
          f"{', API key required' if key else ''}); SIGTERM or Ctrl+C stops it", file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn re-raises SIGTERM after its graceful stop
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    if engine.failure is not None:  # a bug: the requests got errors, the log has the traceback
        raise RuntimeError(f"the engine stopped after an internal error: {engine.failure!r}")
    return 0


__all__ = ["API_KEY_ENV", "ServeError", "add_arguments", "api_key", "bind", "is_loopback", "run"]
