"""The examples in python/examples run and say what they did."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_pubsub_example(transport):
    out = run(str(EXAMPLES / "pubsub.py"), transport)
    lines = out.splitlines()
    assert len(lines) == 5
    assert lines[-1] == "step 4: w (256, 1024) float32, mean 2.500"


def test_service_example():
    out = run(str(EXAMPLES / "service.py"))
    assert "norm 5.0 y [1.2 1.6]" in out
    assert "refused: bad_input: x holds NaN or infinity" in out
    assert "refused: bad_request" in out
    assert out.splitlines()[-1].startswith("norms [")


def test_proxies_example():
    out = run(str(EXAMPLES / "proxies.py"))
    lines = out.splitlines()
    assert len(lines) == 4, out
    for step, line in enumerate(lines):
        assert line.startswith(f"step {step}: 4 MiB via proxy "), line
        assert f"sum {(step + 1) * 1024 * 1024} " in line, line
