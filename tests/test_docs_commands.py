"""The docs stay true to the code: every command block of README.md and docs/*.md runs, in file
order, in one scratch folder, exactly as a reader would paste it.

A fenced block in `bash`, `sh` or `python` runs unless the line before its fence marks it:

    <!-- docs-test: skip: <why it cannot run on a CPU machine here> -->
    <!-- docs-test: server -->   runs against `longctx serve --model models/small` that the test
                                 starts on a free port (it replaces the block's 127.0.0.1:8000)

The server starts as soon as a block has made models/small (shell blocks run traced, `bash -x`:
the next command's trace says the one before it succeeded), so that its start (~12 s) overlaps
the rest of that block; a server block waits until it serves.

The scratch folder holds a link to the repository's .venv (`source .venv/bin/activate` works)
and a short book.txt for `--prompt-file book.txt`; blocks share it, so a model folder that one
block makes is there for the next.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from .deployments.test_serve_multinode import _free_port, _wait_for_serving

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
MARK = re.compile(r"<!--\s*docs-test:\s*(skip|server)\s*:?\s*(.*?)\s*-->")
RUNNERS = {"bash": ["bash", "-e", "-x", "-c"], "sh": ["bash", "-e", "-x", "-c"], "python": [sys.executable, "-c"]}
SERVED_AT = "127.0.0.1:8000"
SERVED_MODEL = "models/small"
BLOCK_TIMEOUT_S = 900


@dataclass(frozen=True)
class Block:
    where: str  # file:line of the fence
    language: str
    code: str
    mark: str | None  # skip, server or None
    reason: str


def _blocks() -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            mark = MARK.search(before)
            line = text[: match.start()].count("\n") + 1
            found.append(Block(f"{path.relative_to(ROOT)}:{line}", match.group(1), match.group(2),
                               mark.group(1) if mark else None, mark.group(2) if mark else ""))  # fmt: skip
    return found


def test_every_command_block_runs_or_says_why_not():
    command_blocks = [block for block in _blocks() if block.language in RUNNERS]
    assert len(command_blocks) >= 5
    assert [block.where for block in command_blocks if block.mark == "skip" and not block.reason] == []
    server_blocks = [block for block in command_blocks if block.mark == "server"]
    assert all(SERVED_AT in block.code for block in server_blocks)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a model made, generations, one server: about 5 minutes on 2 cores
def test_the_docs_command_blocks_run_on_the_cpu(tmp_path):
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "book.txt").write_text((ROOT / "README.md").read_text()[:2000])
    environment = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    environment.pop("RAY_ADDRESS", None)
    server = _Server(tmp_path, environment)
    try:
        for block in _blocks():
            if block.language not in RUNNERS or block.mark == "skip":
                continue
            code = block.code.replace(SERVED_AT, server.address()) if block.mark == "server" else block.code
            returncode, stderr = _run(block.language, code, tmp_path, environment, server.start_once_made)
            assert returncode == 0, f"{block.where} failed:\n{stderr[-3000:]}"
    finally:
        server.stop()


def _run(language: str, code: str, workdir: Path, environment: dict[str, str],
         succeeded) -> tuple[int, str]:  # fmt: skip
    """(exit status, stderr) of a block. A shell block's trace lines ("+ command") are heard as
    they come: each one tells `succeeded` the command before it (bash -e stops at a failure). The
    stderr returned leaves out the trace of sourced scripts ("++", .venv/bin/activate's)."""
    process = subprocess.Popen([*RUNNERS[language], code], cwd=workdir, env=environment, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    watchdog = threading.Timer(BLOCK_TIMEOUT_S, process.kill)  # a hung block fails (killed: -9)
    watchdog.start()
    lines, previous = [], None
    try:
        for line in process.stderr:
            lines.append(line)
            if line.startswith("+"):
                if previous is not None:
                    succeeded(previous)
                previous = line
        returncode = process.wait()
    finally:
        watchdog.cancel()
    return returncode, "".join(line for line in lines if not line.startswith("++"))


class _Server:
    """`longctx serve --model models/small` on a free port, started once a block has made its model
    (or by the first server block), waited for by the first server block."""

    def __init__(self, workdir: Path, environment: dict[str, str]):
        self.workdir, self.environment = workdir, environment
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.serving = False

    def start_once_made(self, command: str) -> None:
        """Start (not waiting) after the command that makes the served model succeeded."""
        if self.process is None and f"make-model {SERVED_MODEL}" in command:
            self._start()

    def address(self) -> str:
        if self.process is None:
            self._start()
        if not self.serving:
            _wait_for_serving(self.process, timeout_s=300)
            self.serving = True
        return f"127.0.0.1:{self.port}"

    def _start(self) -> None:
        self.port = _free_port()
        command = ["longctx", "serve", "--model", SERVED_MODEL, "--port", str(self.port)]
        self.process = subprocess.Popen(command, cwd=self.workdir, env=self.environment, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)  # fmt: skip

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
