"""The examples in python/examples run and say what they did."""

import json
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


def test_the_comparison_bench_runs_and_times_the_receiver(tmp_path):
    out_json = tmp_path / "rows.json"
    out = run(str(EXAMPLES.parent / "benches" / "compare.py"), "--only", "tensorferry",
              "--cases", "rtt,stream", "--rounds", "20", "--count", "3", "--json", str(out_json))
    assert "as the receiver times it" in out, out
    rows = json.loads(out_json.read_text())
    streams = [r for r in rows if r["case"] == "stream 64 MiB"]
    assert {r["transport"] for r in streams} == {"tcp", "shm"}
    for r in streams:
        assert r["messages"] == 3
        assert r["gb_per_s"] > 0 and r["receiver_gb_per_s"] > 0
    rtts = [r for r in rows if r["case"] == "rtt 4 KiB"]
    assert {r["transport"] for r in rtts} == {"tcp", "shm"}
    assert all(r["median_us"] > 0 and r["rounds"] == 20 for r in rtts)
