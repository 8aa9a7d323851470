"""Host time against device time of short jitted calls: is a stream of them host-bound?

Usage (on the GPU machine): ``python3 benchmarks/dispatch_probe.py --problem 1d-32k-gna
1d-32k-na``. For each contestant's jitted forward (ours with `--impl`, cuDNN dense, and a
jitted ``q + 1`` for JAX's own dispatch cost) it issues `--calls` calls back to back and
records, per call, the host time to issue them (before waiting) and the total time once the
last one has finished; the median of `--reps` repetitions is printed. Where the host time
per call reaches the total, the GPU waits for the host: what `jax_gna bench` measures for
that call is the host's time, not the kernel's.

With `--fused N`, ours and cuDNN also run as N calls inside one jitted function (on N
distinct copies of q, so that XLA cannot merge them), as attention runs inside a model's
step: the time per inner call is then the kernels' own, without a dispatch per call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from jax_gna import bench


def probe(fn, args, calls: int, reps: int) -> tuple[float, float]:
    """Median (host seconds, total seconds) per call of `calls` back-to-back ``fn(*args)``."""
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    host, total = [], []
    for _ in range(reps):
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        issued = time.perf_counter()
        jax.block_until_ready(out)
        done = time.perf_counter()
        host.append((issued - start) / calls)
        total.append((done - start) / calls)
    return statistics.median(host), statistics.median(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", nargs="+", default=["1d-32k-gna", "1d-32k-na"])
    parser.add_argument("--impl", default="cuda")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--fused", type=int, default=0,
                        help="also time N calls inside one jitted function (0: no)")
    opts = parser.parse_args()
    print(f"{'problem':<14} {'contestant':<10} {'host us/call':>13} {'total us/call':>14}")
    for name in opts.problem:
        problem = bench.get_problem(name)
        args = bench.make_inputs(problem)
        contestants = {
            opts.impl: bench.gna_function(problem, opts.impl, "fwd"),
            "cudnn": bench.dense_function(problem, "cudnn", "fwd"),
            "q + 1": jax.jit(lambda q, k, v, ct: q + 1),
        }
        for label, fn in contestants.items():
            host, total = probe(fn, args, opts.calls, opts.reps)
            print(f"{name:<14} {label:<10} {host * 1e6:13.1f} {total * 1e6:14.1f}")
        if opts.fused > 0:
            q, rest = args[0], tuple(args[1:])
            qs = [q * (1 + i / 64) for i in range(opts.fused)]
            for label in (opts.impl, "cudnn"):
                one = contestants[label]
                fused = jax.jit(lambda qs, *rest, one=one: [one(x, *rest) for x in qs])
                host, total = probe(fused, (qs, *rest), max(1, opts.calls // opts.fused),
                                    opts.reps)
                n = opts.fused
                print(f"{name:<14} {label + ' x' + str(n):<10} {host / n * 1e6:13.1f} "
                      f"{total / n * 1e6:14.1f}")


if __name__ == "__main__":
    main()
