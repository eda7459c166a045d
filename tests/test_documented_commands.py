"""Docs are tests: every shell command in README.md and docs/*.md runs as written.

Each fenced ``bash``/``sh``/``shell``/``console`` block is read line by line (``\\`` continues a
line, ``#`` starts a comment). The commands of one document run in order, in a fresh copy of the
repository (so a later command finds what an earlier one wrote: ``<time>`` in a path is the
newest match, ``ckpt=...`` the newest ``last.ckpt``; a document that names a run none of its
commands makes gets README's quickstart, trained for 2 steps), with:

* training length and prompt counts appended (:data:`LENGTH`; a key the command already sets
  gets the appended value), nothing else;
* a trailing comment saying ``GPU``, ``needs weights`` or ``+ weights`` -> composed only: Hydra entry points with
  ``--cfg job`` (``-m`` dropped: Hydra takes one of the two; ``torchrun ... -m module`` becomes
  ``python -m module``), ``make`` with ``-n``; any other such command is skipped, saying why;
* a trailing comment naming a duration in minutes or hours, or ``network`` -> ``slow``: the slow
  test runs the whole document in order; the fast one skips the long commands and any later
  command that needs their outputs (a placeholder nothing matches), saying so;
* ``make test`` / ``make test-slow`` (this suite itself) -> ``make -n``;
* ``pip install ...`` -> skipped, saying why: it would reinstall the environment this suite runs
  in (``make venv`` installs it from the same ``pyproject.toml``);
* a server (:data:`SERVERS`: ``python demo.py ...``) -> started as written, passes once it says it
  is serving and its page answers on loopback, then stopped.

New commands in any document are picked up without editing this file.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, SHARED_CORPORA

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
NEEDS_HARDWARE = re.compile(r"\bGPUs?\b|\bneeds weights\b|\+ weights\b")
LONG = re.compile(r"\bnetwork\b|\d+\s*(min|minutes|h|hours)\b|\bminutes\b|\bhours\b")
HYDRA_SCRIPTS = ("train.py", "evaluate.py", "export_mesh.py", "train_prior.py", "demo.py")
# What may be appended: training length and prompt counts, per entry point.
LENGTH = {
    "train.py": ["trainer.max_steps=2"],
    "train_prior.py": ["train.max_steps=2"],
    "evaluate.py": ["max_prompts=1"],
    "asd3d.claims.toy2d": ["steps=2"],
    "asd3d.claims.error_curve": ["fine_tune.steps=2", "images.num_prompts=2"],
    "asd3d.claims.gradient_norms": ["images.num_prompts=2"],
}
SUITE_TARGETS = {"test", "test-slow"}
SERVERS = {"demo.py"}  # entry points that serve until stopped
SERVING = re.compile(r"Running on local URL:\s*(http://\S+)")
SERVER_READY_S = 600
# What a document that names ``outputs/train/runs/<time>`` without making it assumes exists.
PREREQUISITE = ["python", "train.py", "experiment=quickstart", "trainer.max_steps=2"]
TIMEOUT_S = 1200


@dataclass(frozen=True)
class Command:
    document: Path
    line: int
    text: str  # the command as written, comment removed
    comment: str

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(REPO)}:{self.line}"

    @property
    def composed_only(self) -> bool:
        return bool(NEEDS_HARDWARE.search(self.comment))

    @property
    def long(self) -> bool:
        return bool(LONG.search(self.comment))


def split_comment(line: str) -> tuple[str, str]:
    """``python x.py a=1   # why`` -> (``python x.py a=1``, ``why``); ``#`` inside quotes stays."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def documented_commands(document: Path) -> list[Command]:
    commands, block, pending, start, comments = [], None, "", 0, []
    for number, line in enumerate(document.read_text().splitlines(), start=1):
        fence = re.match(r"^\s*```(\S*)", line)
        if fence:
            block = None if block is not None else fence.group(1)
            continue
        if block not in SHELL_BLOCKS:
            continue
        text, comment = split_comment(line)
        if not pending:
            start, comments = number, []
        comments.append(comment)
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        full = " ".join((pending + text).split())
        pending = ""
        if full:
            commands.append(Command(document, start, full, " ".join(c for c in comments if c)))
    return commands


def entry_index(argv: list[str]) -> int | None:
    """Where the script or module a ``python`` command runs is (``train.py``, ``-m asd3d.x``)."""
    for i, arg in enumerate(argv):
        if arg == "-m" and i + 1 < len(argv):
            return i + 1
        if arg.endswith(".py"):
            return i
    return None


def entry_name(argv: list[str]) -> str:
    index = entry_index(argv)
    return "" if index is None else Path(argv[index]).name


def sandbox(tmp: Path) -> Path:
    """A copy of the repository's files, its virtualenv linked (never reinstalled by make)."""
    root = tmp / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True
    )
    files = listed.stdout.split() if listed.returncode == 0 else []
    for name in files:
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    (root / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    os.utime(root / "pyproject.toml", (0, 0))  # older than the venv's stamp: make installs nothing
    return root


def newest(root: Path, pattern: str) -> str:
    matches = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    assert matches, f"nothing matches {pattern} (an earlier command of the document makes it)"
    return str(matches[-1].relative_to(root))


def fill_placeholders(argv: list[str], root: Path) -> list[str]:
    """``<time>``-style path parts -> the newest existing match; ``ckpt=...`` -> newest last.ckpt."""
    filled = []
    for arg in argv:
        key, eq, value = arg.rpartition("=") if "=" in arg else ("", "", arg)
        if value == "...":
            value = newest(root, "outputs/**/checkpoints/last.ckpt")
        elif re.search(r"<[a-z ]+>", value) and not value.startswith("/"):
            value = newest(root, re.sub(r"<[a-z ]+>", "*", value))
        filled.append(f"{key}{eq}{value}")
    return filled


def command_line(command: Command, root: Path) -> list[str] | str:
    """What to run (argv for bash), or a reason to skip."""
    text = command.text
    argv = shlex.split(text)
    if "pip" in argv and "install" in argv:
        return "installs packages: it would reinstall the environment this suite runs in"
    if argv[0] == "make":
        dry = command.composed_only or bool(SUITE_TARGETS & set(argv[1:]))
        return ["make", "-n", *argv[1:]] if dry else argv
    if command.composed_only:
        if argv[0] == "torchrun":
            argv = ["python", *argv[argv.index("-m") :]]
        index, entry = entry_index(argv), entry_name(argv)
        if index is None or argv[0] not in ("python", "python3"):
            return f"needs what its comment names ({command.comment}); not a Hydra command"
        if not (entry in HYDRA_SCRIPTS or entry.startswith("asd3d.")):
            return f"needs what its comment names ({command.comment}); not a Hydra command"
        options = [a for a in argv[index + 1 :] if a not in ("-m", "--multirun")]
        return [*argv[: index + 1], *fill_placeholders(options, root), "--cfg", "job"]
    if "&&" in argv or "|" in argv:
        return ["bash", "-c", text]
    return with_length(fill_placeholders(argv, root), LENGTH.get(entry_name(argv), []))


def with_length(argv: list[str], length: list[str]) -> list[str]:
    """``argv`` with the training length / prompt counts: replaced where set, else appended to
    the overrides (before trailing Hydra flags such as ``--cfg job``, which must come last)."""
    keys = {item.split("=", 1)[0]: item for item in length}
    replaced = [keys.pop(a.split("=", 1)[0], a) if "=" in a else a for a in argv]
    flags = next((i for i, a in enumerate(replaced) if i > 1 and a.startswith("--")), len(replaced))
    return [*replaced[:flags], *keys.values(), *replaced[flags:]]


def serve_once(argv: list[str], root: Path, env: dict[str, str]) -> str | None:
    """Start a server command as written; ``None`` once it serves a page on loopback, else what
    went wrong. The server is stopped (SIGINT, as Ctrl+C) either way."""
    import signal
    import threading
    import urllib.request

    server = subprocess.Popen(
        argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    url: list[str] = []

    def read() -> None:
        assert server.stdout is not None
        for line in server.stdout:
            lines.append(line)
            found = SERVING.search(line)
            if found and not url:
                url.append(found.group(1))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + SERVER_READY_S
        while not url and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if not url:
            return f"never said it was serving:\n{''.join(lines)[-2000:]}"
        # 0.0.0.0 (all interfaces) is reached on loopback.
        page = url[0].replace("0.0.0.0", "127.0.0.1")
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
        with direct.open(page, timeout=60) as response:
            if response.status != 200:
                return f"served {page} with HTTP {response.status}"
        return None
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        reader.join(timeout=10)


def run_document(document: Path, tmp: Path, long: bool) -> int:
    """Run the document's commands in order in a fresh sandbox (``long``: the long ones too)."""
    root = sandbox(tmp)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "ASD3D_CORPORA_DIR": str(SHARED_CORPORA),
    }
    ran, after_long, failures = 0, False, []
    for command in documented_commands(document):
        if command.long and not long:
            print(f"{command.where}: long, runs in the slow test")
            after_long = True
            continue
        try:
            argv = command_line(command, root)
        except AssertionError:
            if after_long:
                print(f"{command.where}: needs a long command's outputs, runs in the slow test")
                continue
            # A run the document takes for granted (README's): made once, then the command.
            subprocess.run(PREREQUISITE, cwd=root, env=env, check=True, capture_output=True)
            argv = command_line(command, root)
        if isinstance(argv, str):
            print(f"{command.where}: skipped: {argv}")
            continue
        print(f"{command.where}: {shlex.join(argv)}")
        if entry_name(argv) in SERVERS and "--cfg" not in argv:
            problem = serve_once(argv, root, env)
            if problem:
                failures.append(f"{command.where}: `{command.text}` {problem}")
            ran += 1
            continue
        result = subprocess.run(
            argv, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
        if result.returncode != 0:
            failures.append(
                f"{command.where}: `{command.text}` ran as `{shlex.join(argv)}` and exited "
                f"{result.returncode}:\n{(result.stdout + result.stderr)[-2000:]}"
            )
        ran += 1
    assert not failures, "\n\n".join(failures)
    return ran


@pytest.mark.timeout(
    3600
)  # a document's commands in order (README: ~20 runs); pyproject's 900 s is per test
@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_documented_commands_run_as_written(document, tmp_path):
    run_document(document, tmp_path, long=False)


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
@pytest.mark.parametrize(
    "document",
    [d for d in DOCUMENTS if any(c.long for c in documented_commands(d))],
    ids=lambda p: p.name,
)
def test_documents_with_long_commands_run_whole(document, tmp_path):
    run_document(document, tmp_path, long=True)


def test_parsing_joins_lines_and_reads_comments(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text\n```bash\n# a comment line\npython train.py a=1 \\\n    'b={0:1}'   # GPU only\n"
        "make help\n```\n```python\nprint('not a command')\n```\n"
    )
    commands = documented_commands(doc)
    assert [(c.line, c.text, c.comment) for c in commands] == [
        (4, "python train.py a=1 'b={0:1}'", "GPU only"),
        (6, "make help", ""),
    ]
    assert commands[0].composed_only and not commands[1].composed_only
    assert Command(doc, 1, "x", "downloads, ~15 min").long
    assert not Command(doc, 1, "x", "ASD against weights/miniature").composed_only
    assert not Command(doc, 1, "x", "no weights needed").composed_only
    assert Command(doc, 1, "x", "needs weights (docs/mvdream.md)").composed_only
    assert with_length(["x.py", "a=1", "steps=500"], ["steps=2", "n=1"]) == [
        "x.py",
        "a=1",
        "steps=2",
        "n=1",
    ]
    assert with_length(["x.py", "a=1", "--cfg", "job"], ["n=1"]) == [
        "x.py",
        "a=1",
        "n=1",
        "--cfg",
        "job",
    ]
