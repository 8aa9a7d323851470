"""Sustained forward calls of ours and cuDNN's, with the card's SM clock and power sampled.

Usage (on the GPU machine): ``python3 benchmarks/clock_probe.py --problem flux-4k-gna
--seconds 4``. Each contestant's jitted forward runs back to back for the given time (after
one warm-up call); meanwhile `nvidia-smi` is polled every 0.2 s. Prints, per problem and
contestant: ms per call, TFLOP/s (of the FLOPs each contestant needs, as `jax_gna bench`), the
median SM clock (MHz), power (W) and temperature (C) of the samples in the second half of
the run (the card's clock settles under its power cap within about a second).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import threading
import time

import jax

from jax_gna import bench

_FIELDS = "clocks.sm,power.draw,temperature.gpu"


def _poll(samples: list, stop: threading.Event, period: float = 0.2) -> None:
    while not stop.is_set():
        out = subprocess.run(["nvidia-smi", f"--query-gpu={_FIELDS}",
                              "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, check=False).stdout
        try:
            samples.append((time.perf_counter(), *map(float, out.split(","))))
        except ValueError:
            pass
        stop.wait(period)


def sustained(fn, args, seconds: float) -> tuple[float, list]:
    """(ms per call, [(time, clock, power, temperature)]) of `fn` run back to back."""
    jax.block_until_ready(fn(*args))
    samples: list = []
    stop = threading.Event()
    poller = threading.Thread(target=_poll, args=(samples, stop), daemon=True)
    poller.start()
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < seconds:
        for _ in range(4):
            out = fn(*args)
        jax.block_until_ready(out)
        calls += 4
    elapsed = time.perf_counter() - start
    stop.set()
    poller.join()
    late = [s for s in samples if s[0] - start > elapsed / 2] or samples
    return 1e3 * elapsed / calls, late


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problem", nargs="+", default=["flux-4k-gna"])
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args()
    print(f"{'problem':14} {'contestant':10} {'ms':>8} {'TF/s':>9} {'MHz':>6} {'W':>6} "
          f"{'C':>4}")
    for name in args.problem:
        problem = bench.get_problem(name)
        q, k, v, ct = bench.make_inputs(problem)
        for who in ("cuda", "cudnn"):
            flops = problem.gna_flops("fwd") if who == "cuda" else problem.dense_flops("fwd")
            fn = (bench.gna_function(problem, "cuda", "fwd") if who == "cuda"
                  else bench.dense_function(problem, "cudnn", "fwd"))
            ms, late = sustained(fn, (q, k, v, ct), args.seconds)
            med = [statistics.median(s[i] for s in late) if late else float("nan")
                   for i in (1, 2, 3)]
            print(f"{name:14} {who:10} {ms:8.3f} {flops / ms * 1e-9:9.1f} {med[0]:6.0f} "
                  f"{med[1]:6.0f} {med[2]:4.0f}", flush=True)


if __name__ == "__main__":
    main()
