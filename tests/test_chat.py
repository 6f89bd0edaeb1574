"""`tunesmith chat` in a terminal (a pty): the answers are the engine's greedy answers for the
conversation so far, the history is kept, /reset clears it, /exit quits; the answer is streamed
(written piece by piece as it is decoded)."""
from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tunesmith
from tunesmith.commands.chat import repl
from tunesmith.infer.engine import Engine, SamplingParams

SRC = str(Path(__file__).resolve().parents[1] / "src")


class Terminal:
    """A child process on a pseudo-terminal; ``until`` reads its output up to a pattern."""

    def __init__(self, cmd: list[str]):
        self.fd, child = pty.openpty()
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(cmd, stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
        os.close(child)
        self.buf = ""

    def until(self, pattern: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.buf):
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in:\n{self.buf}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    self.buf += os.read(self.fd, 4096).decode("utf-8", "replace").replace("\r\n", "\n")
                except OSError:   # the child closed the terminal
                    assert re.search(pattern, self.buf), self.buf
        m = re.search(pattern, self.buf)
        out, self.buf = self.buf[:m.start()], self.buf[m.end():]
        return out

    def send(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())
        self.until(re.escape(line) + "\n")   # the terminal's echo of what was typed

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.fd)


@pytest.mark.slow   # a child process that imports torch and transformers: 10-25 s here
def test_chat_in_a_terminal_keeps_and_resets_the_history():
    term = Terminal([sys.executable, "-m", "tunesmith.cli", "chat", "random:llama", "--device", "cpu",
                     "--temperature", "0", "--max-tokens", "6"])
    try:
        term.until(r"/exit quits\n")
        term.until("> ")
        answers = []
        for line in ("hello", "more please", "/reset", "hello", "/exit"):
            term.send(line)
            if line != "/exit":
                answers.append(term.until(r"\n> ").strip())
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()
    model, tok = tunesmith.load("random:llama", device="cpu")
    engine = Engine(model, tok, fast=False)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    first = engine.generate(messages=[[{"role": "user", "content": "hello"}]], params=greedy)[0].text
    second = engine.generate(messages=[[{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                                        {"role": "user", "content": "more please"}]], params=greedy)[0].text
    assert answers == [first, second, "(history cleared)", first]


def test_the_answer_is_written_as_it_is_decoded(tokenizer):
    from helpers import tiny
    engine = Engine(tiny("llama"), tokenizer, fast=False).start()
    writes = []

    class Out(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)
    lines = iter(["hi", "/bogus", "/exit"])
    try:
        repl(engine, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), read=lambda _: next(lines), out=Out())
    finally:
        engine.shutdown()
    pieces = [w for w in writes[: writes.index("\n")] if w]
    assert len(pieces) >= 4                                   # one write per decoded piece, not one at the end
    assert any("unknown command /bogus" in w for w in writes)
