"""What the host and the GPU do between two separate jitted calls of one forward.

Usage (on the GPU machine): ``python3 benchmarks/stream_probe.py --problem 1d-32k-na``. It
runs `--calls` back-to-back calls of our jitted forward under `jax.profiler` (CUPTI), then
prints each of our kernels' start and duration on the device and every host and device
event, in time order, from shortly before the third kernel to the end of the fourth,
relative to the third kernel's start. What XLA and PJRT put on the stream between two
executables (and whether the next kernel starts before the last one ends, as programmatic
dependent launch allows) shows there.
"""

from __future__ import annotations

import argparse
import glob
import tempfile

import jax

from jax_gna import bench


def events_of(xplane_path: str) -> list[tuple[int, int, str, str, str]]:
    """All events of a profile, as (start ns, duration ns, plane, line, name), in time order."""
    data = jax.profiler.ProfileData.from_file(xplane_path)
    return sorted((ev.start_ns, ev.duration_ns, plane.name, line.name, ev.name)
                  for plane in data.planes for line in plane.lines for ev in line.events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="1d-32k-na")
    parser.add_argument("--impl", default="cuda")
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--kernel", default="gna::", help="text in our kernels' names")
    parser.add_argument("--before-us", type=float, default=20.0,
                        help="how far before the third kernel the listing starts")
    opts = parser.parse_args()
    problem = bench.get_problem(opts.problem)
    args = bench.make_inputs(problem)
    fn = bench.gna_function(problem, opts.impl, "fwd")
    for _ in range(5):
        jax.block_until_ready(fn(*args))
    logdir = tempfile.mkdtemp()
    with jax.profiler.trace(logdir):
        out = None
        for _ in range(opts.calls):
            out = fn(*args)
        jax.block_until_ready(out)
    events = events_of(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0])
    kernels = [e for e in events if e[2].startswith("/device:GPU") and opts.kernel in e[4]]
    print(f"{len(events)} events; {len(kernels)} of our kernels on the device")
    for start, duration, *_ in kernels:
        print(f"  kernel at {start / 1e3:.1f} us, {duration / 1e3:.1f} us")
    if len(kernels) < 4:
        return
    t0 = kernels[2][0]
    first, last = t0 - opts.before_us * 1e3, kernels[3][0] + kernels[3][1]
    print(f"{'us from kernel 3':>16} {'dur us':>8}  {'plane':<16} {'line':<24} event")
    for start, duration, plane, line, name in events:
        if first <= start <= last:
            print(f"{(start - t0) / 1e3:16.2f} {duration / 1e3:8.2f}  {plane[:16]:<16} "
                  f"{line[:24]:<24} {name[:90]}")


if __name__ == "__main__":
    main()
