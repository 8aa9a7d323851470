"""The examples run as a user runs them (subprocesses), with CI-sized budgets.

The full training run (>= 95 % test accuracy) is the README command
``python examples/train_digits.py --check``; here a shortened run must still learn.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout: int = 600) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_quickstart_runs_and_its_checks_hold():
    out = run_example("quickstart.py")
    assert "na2d agrees: True" in out
    assert "equals GNA ⊕ dense-text merge: True" in out
    assert "FLOP-wise speedup 11.111x" in out          # 30x48x80, 18x24x24, 16x8x8
    line = next(l for l in out.splitlines() if "max |out - reference|" in l)
    assert float(line.rsplit("=", 1)[1]) < 1e-4


def _amdahl(share, speedup):
    return 1.0 / ((1.0 - share) + share / speedup)


@pytest.mark.parametrize("layout, extra", [
    ("video", []),
    ("flux", ["--configs", "gna", "--iters", "1", "--warmup", "0", "--no-rope"]),
])
def test_video_dit_small_reports_what_the_benchmark_needs(tmp_path, layout, extra):
    out_path = tmp_path / "report.json"
    run_example("video_dit.py", "--small", "--layout", layout, "--out", str(out_path), *extra)
    report = json.loads(out_path.read_text())
    # Whole-axis GNA (with the text tokens merged in) must reproduce the dense stack.
    assert report["verify_max_abs_diff"] < 1e-4
    results = report["results"]
    assert set(results) == ({"dense", "gna", "na"} if layout == "video" else {"dense", "gna"})
    for key in ("device", "date", "dtype", "dense_implementation", "jax_gna_implementation"):
        assert report[key]
    share = min(results["dense"]["attention_share"], 0.999)
    for name, r in results.items():
        assert r["stack_ms"] > 0 and r["attention_ms"] > 0 and r["attention_share"] > 0
        if name == "dense":
            continue
        assert r["attention_flop_speedup"] > 1.0
        assert r["e2e_speedup"] == pytest.approx(results["dense"]["stack_ms"] / r["stack_ms"])
        assert r["amdahl_bound_flop"] == pytest.approx(
            _amdahl(share, r["attention_flop_speedup"]))
        assert r["fraction_of_flop_bound"] == pytest.approx(
            r["e2e_speedup"] / r["amdahl_bound_flop"])


def test_train_digits_short_run_learns():
    out = run_example("train_digits.py", "--steps", "60", "--log-every", "20", "--check",
                      "--target", "0.8")
    line = next(l for l in out.splitlines() if l.startswith("test accuracy"))
    assert float(line.split()[2]) >= 0.8


def test_context_parallel_example_agrees_with_one_device():
    out = run_example("context_parallel.py", "--implementation", "xla")
    assert "4 devices, 6 frames each" in out, out
    assert "receives 3 frames from its predecessor and 0 from its successor" in out, out
    assert "agrees: True" in out, out
