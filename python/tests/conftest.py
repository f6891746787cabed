"""Shared helpers: peers in other processes, and optional libraries."""

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

# Every child gets a runtime directory of its own (shared-memory names and
# GPU drivers look there).
os.environ.setdefault("XDG_RUNTIME_DIR", os.environ.get("TMPDIR", "/tmp"))


def unique(prefix: str) -> str:
    """A name no other test run uses (for shm:// and inproc:// addresses)."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Peer:
    """A Python process running `code`; it talks to the test through lines
    of JSON on stdout (`emit(...)` in the child)."""

    PRELUDE = textwrap.dedent(
        """
        import json, sys
        import numpy as np
        import tensorferry as tf

        def emit(**kw):
            print(json.dumps(kw), flush=True)
        """
    )

    def __init__(self, code: str, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.PRELUDE + textwrap.dedent(code), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def line(self, timeout: float = 30.0) -> dict:
        """The next line the child emitted, as a dict."""
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            self.fail(f"no line from the peer within {timeout} s")
        text = self.proc.stdout.readline()
        if not text:
            self.fail("the peer ended without a line")
        return json.loads(text)

    def fail(self, why: str):
        self.proc.kill()
        _, err = self.proc.communicate(timeout=10)
        pytest.fail(f"{why}; its stderr:\n{err}")

    def wait(self, timeout: float = 30.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"the peer did not end within {timeout} s")
        if rc != 0:
            err = self.proc.stderr.read()
            pytest.fail(f"the peer exited with {rc}; its stderr:\n{err}")
        return rc

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


@pytest.fixture
def peer():
    """Starts peers; kills any still running at the end of the test."""
    started = []

    def start(code: str, *args: str) -> Peer:
        p = Peer(code, *args)
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()


def optional(name: str):
    """The module, or None when it is not installed."""
    try:
        return __import__(name)
    except ImportError:
        return None
