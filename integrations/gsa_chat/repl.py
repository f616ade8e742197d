"""The interactive loop of ``gsa chat``: read input, run ``/commands``, stream replies.

Why a table of commands: ``/help`` is generated from it and an unknown command gets the list (and a
close match), so the help can never drift from what the loop accepts. Input lines ending in ``\\``
continue on the next line, and a line of ``\"\"\"`` opens and closes a multi-line block. Ctrl+C during a
reply stops it and keeps the text so far; at the prompt it only clears the line; Ctrl+D exits (inside a
block or a continued line, it first sends what was typed). Input that is not valid UTF-8 is kept with
U+FFFD in place of the bad bytes; output never passes terminal control characters through.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO

from gsa_common.text import terminal_safe, valid_text

from gsa_chat.session import ChatSession
from gsa_core.errors import GSAError, did_you_mean

PROMPT, CONTINUE_PROMPT = "> ", "... "
BLOCK = '"""'


@dataclass(frozen=True)
class Command:
    usage: str
    help: str
    run: Callable[[Repl, str], bool | None]  # returns True to leave the loop


class Output:
    """Where the chat writes: streamed text stays plain; notes are coloured only on a colour terminal."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.color = (self.stream.isatty() and not os.environ.get("NO_COLOR")
                      and os.environ.get("TERM", "") != "dumb")
        self._console = None
        if self.color:
            from rich.console import Console

            self._console = Console(file=self.stream, highlight=False, soft_wrap=True)

    def text(self, piece: str) -> None:
        """Streamed model text, with terminal control characters made visible instead of obeyed."""
        self.stream.write(terminal_safe(piece))
        self.stream.flush()

    def note(self, message: str, style: str = "dim") -> None:
        """A line of our own; stored model text in it (``/history``) is made as harmless as streamed text."""
        message = terminal_safe(message)
        if self._console is not None:
            from rich.markup import escape

            self._console.print(escape(message), style=style)
        else:
            self.stream.write(message + "\n")
        self.stream.flush()

    def error(self, message: str) -> None:
        self.note(f"error: {message}", style="bold red")


class EndOfInput(EOFError):
    """Ctrl+D (or the end of a script) inside a block or a continued line: ``partial`` is what came before."""

    def __init__(self, partial: str):
        super().__init__("end of input inside a message")
        self.partial = partial


def read_message(read_line: Callable[[str], str]) -> str:
    """One message: continued by a trailing backslash, or a block between lines of three double quotes.

    The end of input in the middle of one raises :class:`EndOfInput` carrying the lines read so far.
    """
    first = read_line(PROMPT)
    lines: list[str] = []
    try:
        if first.strip() == BLOCK:
            while (line := read_line(CONTINUE_PROMPT)).strip() != BLOCK:
                lines.append(line)
            return "\n".join(lines)
        lines.append(first)
        while lines[-1].endswith("\\") and not lines[-1].endswith("\\\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(read_line(CONTINUE_PROMPT))
    except EOFError:
        raise EndOfInput("\n".join(lines)) from None
    return "\n".join(lines)


@contextlib.contextmanager
def sigint_sets(event: threading.Event) -> Iterator[None]:
    """While inside, Ctrl+C sets ``event`` (generation stops after the current token) instead of raising."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Repl:
    """The loop. ``read_line(prompt)`` returns a line or raises ``EOFError`` (Ctrl+D) / ``KeyboardInterrupt``."""

    def __init__(self, chat: ChatSession, out: Output | None = None,
                 read_line: Callable[[str], str] | None = None):
        self.chat, self.out = chat, out or Output()
        raw = read_line or _terminal_input()
        self.read_line = lambda prompt: valid_text(raw(prompt))

    def run(self) -> int:
        self.out.note(f"gsa chat: {self.chat.chat_model.name} · template {self.chat.template.name} · session "
                      f"{self.chat.session.label}. /help lists commands; /exit or Ctrl+D quits.")
        leaving = False
        while not leaving:
            try:
                message = read_message(self.read_line)
            except EndOfInput as end:
                self.out.text("\n")
                message, leaving = end.partial, True
                if message.strip():
                    self.out.note("(end of input inside a message: sending what was typed)")
            except EOFError:
                self.out.text("\n")
                break
            except KeyboardInterrupt:
                self.out.text("\n")
                self.out.note("(Ctrl+C clears the line; /exit or Ctrl+D quits)")
                continue
            if not message.strip():
                continue
            try:
                if message.startswith("/") and self.command(message):
                    break
                if not message.startswith("/"):
                    self.respond(lambda on_text, stop, text=message: self.chat.send(text, on_text=on_text,
                                                                                     interrupt=stop))
            except GSAError as exc:
                self.out.error(str(exc))
        self.out.note(f"session {self.chat.session.label} saved in {self.chat.store.path}")
        return 0

    def respond(self, produce: Callable[..., object]) -> None:
        stop = threading.Event()
        with sigint_sets(stop):
            reply = produce(self.out.text, stop)
        self.out.text("\n")
        reason = getattr(reply, "finish_reason", "")
        if reason == "interrupted":
            self.out.note("[stopped: the partial reply is kept]")
        elif reason == "length":
            self.out.note("[max_new_tokens reached]")

    def command(self, line: str) -> bool:
        name, _, arg = line[1:].strip().partition(" ")
        command = COMMANDS.get(name.lower())
        if command is None:
            hint = did_you_mean(name, COMMANDS)
            extra = f" Did you mean /{hint}?" if hint else ""
            self.out.error(f"unknown command /{name}.{extra} Commands: {', '.join('/' + c for c in COMMANDS)}")
            return False
        return bool(command.run(self, arg.strip()))


def _terminal_input() -> Callable[[str], str]:
    with contextlib.suppress(AttributeError, ValueError, OSError):  # bytes that are not UTF-8 reach valid_text
        sys.stdin.reconfigure(errors="surrogateescape")
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    return input


def script_reader(lines: list[str], out: Output) -> Callable[[str], str]:
    """``read_line`` for a scripted conversation: each line is shown after its prompt, as if typed."""
    queue = list(lines)

    def read_line(prompt: str) -> str:
        if not queue:
            raise EOFError
        line = queue.pop(0).rstrip("\n")
        out.text(f"{prompt}{line}\n")
        return line

    return read_line


# commands -------------------------------------------------------------------------------------------
def _exit(repl: Repl, arg: str) -> bool:
    return True


def _reset(repl: Repl, arg: str) -> None:
    repl.chat.reset()
    repl.out.note(f"new session {repl.chat.session.label} (same model, template, settings and system prompt)")


def _regen(repl: Repl, arg: str) -> None:
    if repl.chat.settings.seed is not None:
        repl.out.note(f"(seed is fixed at {repl.chat.settings.seed}, so the same prompt gives the same reply; "
                      "/set seed none for a different one)")
    repl.respond(lambda on_text, stop: repl.chat.regenerate(on_text=on_text, interrupt=stop))


def _set(repl: Repl, arg: str) -> None:
    name, _, value = arg.partition(" ")
    if not name:
        for key, val in repl.chat.describe().items():
            repl.out.note(f"{key} = {val}", style="")
        return
    if not value.strip():
        repl.out.error(f"/set {name} needs a value: /set PARAM VALUE (/set alone lists the settings)")
        return
    repl.out.note(f"{name} = {repl.chat.set(name, value)}")


def _system(repl: Repl, arg: str) -> None:
    if not arg:
        current = repl.chat.session.system
        repl.out.note(f"system prompt: {current!r}" if current else "no system prompt (/system TEXT sets one)")
        return
    text = "" if arg.lower() == "none" else arg
    repl.chat.set_system(text)
    note = "system prompt cleared" if not text else "system prompt set"
    if text and not repl.chat.template.uses_system:
        note += f" (the {repl.chat.template.name!r} template does not use it)"
    repl.out.note(note)


def _save(repl: Repl, arg: str) -> None:
    if not arg:
        repl.out.error("/save needs a name: /save NAME")
        return
    repl.chat.save(arg)
    repl.out.note(f"saved as {repl.chat.session.label}")


def _load(repl: Repl, arg: str) -> None:
    if not arg:
        repl.out.error("/load needs a session id or name: /load ID|NAME (gsa logs lists them)")
        return
    for note in repl.chat.load(arg):
        repl.out.note(note)
    count = len(repl.chat.turns())
    repl.out.note(f"loaded session {repl.chat.session.label} ({count} messages)")
    _history(repl, "")


def _history(repl: Repl, arg: str) -> None:
    messages = repl.chat.store.messages(repl.chat.session.id)
    if not messages:
        repl.out.note("(no messages yet)")
    for m in messages:
        flag = {"stopped": " [stopped]", "streaming": " [incomplete]"}.get(m.status, "")
        repl.out.note(f"{m.role}{flag}: {m.content}", style="")


def _help(repl: Repl, arg: str) -> None:
    width = max(len(c.usage) for c in COMMANDS.values())
    seen: set[int] = set()
    for command in COMMANDS.values():
        if id(command) not in seen:
            seen.add(id(command))
            repl.out.note(f"{command.usage.ljust(width)}  {command.help}", style="")
    repl.out.note('Multi-line input: end a line with \\ to continue, or put the text between lines of """. '
                  "Ctrl+C stops a reply (keeping it); Ctrl+D quits.", style="")


_EXIT = Command("/exit, /bye", "leave (also Ctrl+D); the session stays saved", _exit)
COMMANDS: dict[str, Command] = {
    "exit": _EXIT,
    "bye": _EXIT,
    "reset": Command("/reset", "start a new empty session", _reset),
    "regen": Command("/regen", "replace the last reply with a new one", _regen),
    "set": Command("/set PARAM VALUE", "change a sampling setting or the template; /set alone lists them", _set),
    "system": Command("/system TEXT", "set the system prompt ('none' clears it)", _system),
    "save": Command("/save NAME", "name this session", _save),
    "load": Command("/load ID|NAME", "continue a saved session", _load),
    "history": Command("/history", "show this session's messages", _history),
    "help": Command("/help", "this list", _help),
}


__all__ = ["COMMANDS", "EndOfInput", "Output", "Repl", "read_message", "script_reader", "sigint_sets"]
