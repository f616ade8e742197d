"""Fuzzing the ``gsa`` command line (docs/safety.md): random arguments and random or damaged files for each command.

The property, for every case: the exit status is 0 or 2 (argparse's usage errors are 2 too), stderr holds no
traceback, nothing escapes ``main``, and no file that existed before changed unless the command was meant to
change it (its output folder with ``--force``/``--resume`` or on success, the chat database for ``gsa chat``).

Runs in-process through ``gsa_cli.main.main`` (fast), with few examples and a fixed seed in the default suite.
``GSA_FUZZ_CAMPAIGN=report.json`` runs a larger random campaign instead: no assertion, every outcome tallied per
command and written to the report (``GSA_FUZZ_SCALE`` multiplies the examples; default 10). The figures in
docs/safety.md came from such campaigns against the code before and after the safety work.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import shutil
import sqlite3
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _safety import DAMAGES, changed, damaged_copy, gsa_checkpoint, snapshot, tiny_bert, tiny_neo
from _train_corpus import write_corpus
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

CAMPAIGN = os.environ.get("GSA_FUZZ_CAMPAIGN", "")
SCALE = int(os.environ.get("GSA_FUZZ_SCALE", "10")) if CAMPAIGN else 1
#: Seconds one case may take (a command that would run for hours, e.g. 10**10 training steps, counts as a failure).
CASE_TIMEOUT = int(os.environ.get("GSA_FUZZ_TIMEOUT", "300"))
TALLY: dict[str, dict] = defaultdict(lambda: {"cases": 0, "exit_0": 0, "failures": 0, "kinds": Counter()})


class CaseTimeout(Exception):
    """Raised by the alarm when a case runs past :data:`CASE_TIMEOUT`."""


def fuzz(examples: int) -> Callable:
    """Few derandomized examples by default; many random ones, unshrunk, in a campaign."""
    phases = [Phase.generate] if CAMPAIGN else [Phase.explicit, Phase.generate, Phase.shrink]
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=not CAMPAIGN, database=None,
                    phases=phases, suppress_health_check=list(HealthCheck))


def _write_report() -> None:
    data = {cmd: {"cases": t["cases"], "exit_0": t["exit_0"], "failures": t["failures"],
                  "kinds": dict(t["kinds"].most_common())}
            for cmd, t in sorted(TALLY.items())}
    Path(CAMPAIGN).write_text(json.dumps(data, indent=2) + "\n")


if CAMPAIGN:
    atexit.register(_write_report)


# ----------------------------------------------------------------------------- running one case
@contextlib.contextmanager
def sandbox() -> Iterator[Path]:
    """A fresh folder that is also ``GSA_HOME``, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="gsa-fuzz-"))
    old = os.environ.get("GSA_HOME")
    os.environ["GSA_HOME"] = str(root / "home")
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop("GSA_HOME", None)
        else:
            os.environ["GSA_HOME"] = old
        for path in root.rglob("*"):  # a fuzzed read-only bit must not block the clean-up
            with contextlib.suppress(OSError):
                path.chmod(0o700 if path.is_dir() else 0o600)
        shutil.rmtree(root, ignore_errors=True)


def run_case(command: str, argv: list[str], root: Path, may_change: Callable[[int], list[Path]],
             sources: tuple[Path, ...] = ()) -> None:
    """Run ``gsa ARGV`` and check the property; ``may_change(code)`` lists the paths the command may modify, and
    nothing under ``sources`` may ever change (not even where ``may_change`` allows it)."""
    import signal

    from gsa_cli.main import main

    def alarm(signum: int, frame: object) -> None:
        raise CaseTimeout(f"still running after {CASE_TIMEOUT} s")

    before = snapshot(root)
    out, err = io.StringIO(), io.StringIO()
    escaped = None
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(CASE_TIMEOUT)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # the property is that nothing escapes
            code, escaped = -1, exc
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    text = err.getvalue()
    problems = []
    if isinstance(escaped, CaseTimeout) or "CaseTimeout" in text:
        problems.append(f"timeout: {argv[:6]}")
    elif escaped is not None:
        problems.append(f"escaped {type(escaped).__name__}: {str(escaped)[:80]}")
    elif code not in (0, 2):
        last = [line for line in text.splitlines() if line.strip()][-1:] or [""]
        problems.append(f"exit {code}: {last[0][:100]}")
    if "Traceback" in text:
        problems.append("traceback: " + ([line for line in text.splitlines() if line.strip()][-1][:100]))
    def under(rel: str, paths: list[Path]) -> bool:
        where = (root / rel).resolve()
        return any(where == p or p in where.parents for p in paths)

    allowed = [p.resolve() for p in may_change(code)]
    protected = [p.resolve() for p in sources if p.exists()]
    modified = [rel for rel in changed(before, snapshot(root)) if under(rel, protected) or not under(rel, allowed)]
    if modified:
        problems.append(f"changed {modified[:3]}")
    tally = TALLY[command]
    tally["cases"] += 1
    tally["exit_0"] += code == 0
    if problems:
        tally["failures"] += 1
        tally["kinds"][problems[0].split(":")[0][:60]] += 1
    if not CAMPAIGN:
        assert not problems, (argv, problems, text[-1500:])


# ----------------------------------------------------------------------------- shared inputs
@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fuzz-assets")
    neo = tiny_neo(base / "neo")
    one_doc = base / "one-doc"
    one_doc.mkdir()
    (one_doc / "a.txt").write_text("Only one document lives in this corpus, so nothing can be held out.\n")
    return {"neo": neo, "bert": tiny_bert(base / "bert"), "gsa": gsa_checkpoint(neo, base / "gsa"),
            "corpus": write_corpus(base / "corpus", n_docs=8, sentences=6), "one_doc": one_doc}


JUNK = ["", "-1", "0", "1", "2", "1e23", str(2**70), "nan", "inf", "abc", "-", "é", "../..", "/nonexistent/x",
        "99999999999999999999", "\udcff", "--", "{}", "[1]", "a=b", "\t", "x" * 300]
junk = st.one_of(st.sampled_from(JUNK), st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=8))
numbers = st.one_of(st.sampled_from(["1", "2", "3", "0", "-2", "4"]), junk)


def options(draw: Callable, table: dict[str, st.SearchStrategy | Callable[[], str] | None],
            at_most: int = 5) -> list[str]:
    """A random selection of ``--flag [value]`` from ``table``: a strategy draws the value, a plain function makes
    it (e.g. writes a file), ``None`` is a flag without a value."""
    argv: list[str] = []
    for name in draw(st.lists(st.sampled_from(sorted(table)), max_size=at_most)):
        argv.append(name)
        value = table[name]
        if isinstance(value, st.SearchStrategy):
            argv.append(draw(value))
        elif value is not None:
            argv.append(value())
    return argv


def put_model(draw: Callable, assets: dict[str, Path], root: Path, kind: str) -> Path:
    """A model folder in ``root``: a copy of an asset, damaged or not, or something that is not a model."""
    choice = draw(st.sampled_from(["good", "good", "damaged", "gsa", "missing", "a-file", "empty-folder"]))
    target = root / "src"
    if choice == "good":
        shutil.copytree(assets[kind], target)
    elif choice == "damaged":
        damaged_copy(assets[kind], target, draw(st.sampled_from(DAMAGES)))
    elif choice == "gsa":
        shutil.copytree(assets["gsa"], target)
    elif choice == "a-file":
        target.write_bytes(draw(st.binary(max_size=64)))
    elif choice == "empty-folder":
        target.mkdir()
    return target


def put_destination(draw: Callable, root: Path, src: Path) -> Path:
    choice = draw(st.sampled_from(["new", "new", "nonempty", "a-file", "the-source", "link-to-source", "nested"]))
    if choice == "nonempty":
        (root / "dst").mkdir()
        (root / "dst" / "keep.txt").write_text("keep me")
    elif choice == "a-file":
        (root / "dst").write_text("a file")
    elif choice == "the-source":
        return src
    elif choice == "link-to-source":
        (root / "dst").symlink_to(src)
    elif choice == "nested":
        return root / "deep" / "er" / "dst"
    return root / "dst"


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**70) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["bank", "n_splats", "covariance", "backend", "name", "params", "initializer", "adaptation",
                         "enabled", "seed", "adapter", "window", "distill", "stage1_steps", "x"]), inner, max_size=4),
    max_leaves=10)


def put_config(draw: Callable, root: Path) -> Path:
    """A config file: valid, mutated, random text or bytes, in a random format."""
    suffix = draw(st.sampled_from([".toml", ".json", ".yaml", ".yml", ".txt", ""]))
    path = root / f"cfg{suffix}"
    kind = draw(st.sampled_from(["valid", "structure", "text", "bytes", "missing"]))
    if kind == "valid":
        n = draw(st.sampled_from(["2", "4", "0", "1e9", '"x"', "-1"]))
        path.write_text({".json": f'{{"bank": {{"n_splats": {n}}}}}', ".toml": f"[bank]\nn_splats = {n}\n"}
                        .get(suffix, f"bank:\n  n_splats: {n}\n"))
    elif kind == "structure":
        import yaml

        data = draw(JSONISH)
        path.write_text(json.dumps(data) if suffix != ".yaml" else yaml.safe_dump(data))
    elif kind == "text":
        path.write_text(draw(st.text(max_size=200)), encoding="utf-8", errors="surrogateescape")
    elif kind == "bytes":
        path.write_bytes(draw(st.binary(max_size=200)))
    return path


def put_chat_db(draw: Callable, root: Path) -> str:
    """The chat database in ``GSA_HOME``: absent, valid with sessions, or damaged. Returns which."""
    db = root / "home" / "data" / "chat.sqlite3"
    kind = draw(st.sampled_from(["absent", "valid", "valid", "random", "truncated", "foreign", "empty"]))
    if kind == "absent":
        return kind
    db.parent.mkdir(parents=True)
    if kind in ("valid", "truncated"):
        from gsa_chat.store import Store

        with Store(db) as store:
            for i in range(draw(st.integers(1, 3))):
                sid = store.create_session(model="m", template="plain", settings={"top_k": i}).id
                store.add_message(sid, "user", draw(st.text(max_size=20)) + "\x1b[2J")
                store.add_message(sid, "assistant", "reply")
        if kind == "truncated":
            for extra in ("-wal", "-shm"):
                Path(f"{db}{extra}").unlink(missing_ok=True)
            size = draw(st.integers(0, 2000))
            db.write_bytes(db.read_bytes()[:size])
            kind = "empty" if size == 0 else kind  # an empty file is a new database (SQLite's rule)
    elif kind == "random":
        db.write_bytes(draw(st.binary(min_size=1, max_size=4096)))
    elif kind == "foreign":
        raw = sqlite3.connect(db)
        raw.execute("CREATE TABLE sessions (x)")
        raw.commit()
        raw.close()
    else:
        db.write_bytes(b"")
    return kind


def chat_db_files(root: Path) -> list[Path]:
    data = root / "home" / "data"
    return [data / f"chat.sqlite3{extra}" for extra in ("", "-wal", "-shm")]


# ----------------------------------------------------------------------------- the commands
@fuzz(30)
@given(data=st.data())
def test_fuzz_plugins(data):
    with sandbox() as root:
        argv = ["plugins", *data.draw(st.lists(st.one_of(st.sampled_from(
            ["list", "--kind", "backend", "adapter", "backends", "--json", "show"]), junk), max_size=4))]
        run_case("plugins", argv, root, lambda code: [])


@fuzz(60)
@given(data=st.data())
def test_fuzz_config(data):
    with sandbox() as root:
        cfg = put_config(data.draw, root)
        if data.draw(st.booleans()):
            argv = ["config", "validate", str(cfg), *data.draw(st.lists(st.sampled_from(["--json", "--x"]),
                                                                        max_size=1))]
            run_case("config", argv, root, lambda code: [])
        else:
            out = data.draw(st.sampled_from([root / "schema.json", cfg, root, root / "no" / "such" / "x.json",
                                             root / "home"]))
            run_case("config", ["config", "schema", "--out", str(out)], root, lambda code: [out])


@fuzz(40)
@given(data=st.data())
def test_fuzz_logs(data):
    with sandbox() as root:
        put_chat_db(data.draw, root)
        argv = ["logs", *data.draw(st.lists(st.one_of(st.sampled_from(["list", "show", "1", "#1", "--json"]), junk),
                                            max_size=2)),
                *options(data.draw, {"--limit": numbers, "--json": None}, 2)]
        run_case("logs", argv, root, lambda code: [])


CHAT_LINES = ["/set temperature 0", "/set top_k 5", "/set max_new_tokens 2", "/set stop \\x", "/set stop [1",
              "/set seed 3", "/set nope 1", "/set template plain", "/set template zzz", "/regen", "/save named",
              "/save 12", "/load 1", "/load nope", "/history", "/system be brief", "/reset", "/help", "/bogus",
              "/exit", '"""', "continued \\", "Once upon a time", "\x1b[2Jhello\x07", ""]


@fuzz(12)
@given(data=st.data())
def test_fuzz_chat(data, assets):
    with sandbox() as root:
        db = put_chat_db(data.draw, root)
        model = put_model(data.draw, assets, root, "neo")
        lines = data.draw(st.lists(st.one_of(st.sampled_from(CHAT_LINES), st.text(max_size=20)), max_size=6))
        script = root / "talk.txt"
        raw = "\n".join(lines).encode("utf-8", "surrogateescape")
        script.write_bytes(raw if data.draw(st.integers(0, 4)) else raw + b"\xff\xfe bad bytes\n")
        argv = ["chat", str(model), "--script", str(script), "--set", "max_new_tokens=2",
                *options(data.draw, {"--set": st.one_of(st.sampled_from(
                    ["temperature=0", "top_k=3", "seed=1", "max_new_tokens=0", "top_p=2", "stop=\\x"]), junk),
                    "--template": st.one_of(st.sampled_from(["plain", "auto", "chat-template"]), junk),
                    "--session": junk, "--continue": None, "--system": junk}, 3)]
        run_case("chat", argv, root, lambda code: chat_db_files(root) if db in ("absent", "valid", "empty") else [])


@fuzz(10)
@given(data=st.data())
def test_fuzz_train(data, assets):
    with sandbox() as root:
        corpus = data.draw(st.sampled_from(["corpus", "corpus", "corpus", "one_doc", "missing", "a-file"]))
        corpus_path = {"missing": root / "nope", "a-file": root / "talk.txt"}.get(corpus)
        if corpus_path is None:
            corpus_path = root / corpus
            shutil.copytree(assets[corpus], corpus_path)
        (root / "talk.txt").write_text("not a corpus folder")
        out = data.draw(st.sampled_from([root / "run", root / "run", root / "full", root / "talk.txt", corpus_path]))
        if out == root / "full":
            out.mkdir()
            (out / "keep.txt").write_text("keep")
        tokenizer = data.draw(st.sampled_from([None, None, "tok", root / "nope", root]))
        if tokenizer == "tok":  # a real tokenizer folder (the tiny chat model's), inside the sandbox
            tokenizer = root / "tok"
            shutil.copytree(assets["neo"], tokenizer)
        argv = ["train", "--out", str(out), "--corpus", str(corpus_path), "--layout", "micro", "--steps", "1",
                "--batch-size", "2", "--block-len", "16", "--eval-blocks", "2", "--vocab-size", "300", "--no-progress",
                *([] if tokenizer is None else ["--tokenizer", str(tokenizer)]),
                *options(data.draw, {"--steps": numbers, "--layout": st.sampled_from(["micro", "tiny", "huge", ""]),
                                     "--attention": st.sampled_from(["softmax", "gsa", "linear"]),
                                     "--config": lambda: str(put_config(data.draw, root)),
                                     "--batch-size": numbers, "--block-len": st.sampled_from(["8", "1", "65", "x"]),
                                     "--lr": st.sampled_from(["1e-3", "0", "inf", "nan", "-1", "1e9"]),
                                     "--seed": numbers, "--checkpoint-every": numbers, "--vocab-size": numbers,
                                     "--warmup-steps": numbers, "--resume": None, "--force": None, "--json": None})]
        forced = "--force" in argv or "--resume" in argv
        run_case("train", argv, root, lambda code: [out] if code == 0 or forced else [],
                 sources=(corpus_path, *([tokenizer] if tokenizer is not None and tokenizer != root else [])))


@fuzz(12)
@given(data=st.data())
def test_fuzz_convert(data, assets):
    with sandbox() as root:
        src = put_model(data.draw, assets, root, data.draw(st.sampled_from(["neo", "bert"])))
        dst = put_destination(data.draw, root, src)
        argv = ["convert", str(src), str(dst),
                *options(data.draw, {"--config": lambda: str(put_config(data.draw, root)),
                                     "--adapter": st.sampled_from(["gpt-neo", "bert", "llama", "nope"]),
                                     "--passthrough": None, "--verify": None, "--json": None, "--force": None}, 4)]
        run_case("convert", argv, root, lambda code: [dst] if code == 0 or "--force" in argv else [], sources=(src,))


@fuzz(8)
@given(data=st.data())
def test_fuzz_distill(data, assets):
    with sandbox() as root:
        src = put_model(data.draw, assets, root, "bert")
        dst = put_destination(data.draw, root, src)
        corpus = root / "corpus"
        shutil.copytree(assets["corpus"], corpus)
        stage2 = data.draw(st.sampled_from(["none", "none", "lora", "full", "qlora"]))
        argv = ["distill", str(src), str(dst), "--corpus", str(corpus), "--max-length", "32", "--batch-size", "4",
                "--calib-tokens", "100", "--stage1-steps", "1", "--splats", "2", "--no-progress",
                *(["--stage2", stage2] + (["--stage2-steps", "1"] if stage2 != "none" else [])),
                *options(data.draw, {"--stage1-steps": numbers, "--splats": numbers, "--max-length": numbers,
                                     "--corpus": st.sampled_from(["/nonexistent", str(root), "stdlibx"]),
                                     "--seed": numbers, "--window": numbers, "--lora-rank": numbers,
                                     "--initializer": st.sampled_from(["pca", "kmeans", "random", "kmean"]),
                                     "--init-params": st.sampled_from(["{}", '{"x": 1}', "[1]", "{"]),
                                     "--regulariser": st.sampled_from(["overlap=0.01", "overlap=-1", "x=1", "bad"]),
                                     "--stage2-steps": numbers, "--checkpoint-every": numbers, "--resume": None,
                                     "--force": None, "--json": None,
                                     "--config": lambda: str(put_config(data.draw, root))}, 4)]
        forced = "--force" in argv or "--resume" in argv
        run_case("distill", argv, root, lambda code: [dst] if code == 0 or forced else [], sources=(src, corpus))


@fuzz(20)
@given(data=st.data())
def test_fuzz_bench_arguments(data):
    """Argument handling only (a benchmark that starts would take minutes): every case holds an invalid option."""
    with sandbox() as root:
        name = data.draw(st.one_of(st.sampled_from(["attention", "init", "adaptation", "decode", "distill_bert",
                                                    "distill_causal", "schedulers", "nope"]), junk))
        argv = ["bench", name, *data.draw(st.lists(st.one_of(st.sampled_from(
            ["--seed", "--out", "--steps", "--threads", "-1", "x"]), junk), max_size=3)), "--no-such-option-at-all"]
        run_case("bench", argv, root, lambda code: [])


@fuzz(6)
@given(data=st.data())
def test_fuzz_demo(data):
    """Bad arguments only: a valid demo trains on the whole standard library for a minute (tests/test_demo.py)."""
    with sandbox() as root:
        steps = data.draw(st.sampled_from(["0", "-1", "abc", str(10**10), "1e3", ""]))
        out = data.draw(st.sampled_from([root / "demo", root / "cfg.toml", root / "no" / "pe"]))
        argv = ["demo", "--steps", steps, "--out", str(out),
                *options(data.draw, {"--seed": numbers, "--config": lambda: str(put_config(data.draw, root))}, 2)]
        run_case("demo", argv, root, lambda code: [out] if code == 0 else [])
