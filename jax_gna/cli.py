"""``python -m jax_gna``: demo, check, bench, sim, find and draw.

Every subcommand is a small function ``cmd_<name>(args) -> exit code`` over the library's
public pieces (`attention`, `simulate`, `find_configs`, `jax_gna.bench`); `main` parses and
dispatches. Bad arguments exit with status 2 and a message naming the parameter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Sequence

import numpy as np

EPILOG = """\
examples:
  python -m jax_gna demo
  python -m jax_gna check
  python -m jax_gna sim 256 256 --window 80 80 --stride 16 16
  python -m jax_gna sim 30 48 80 --window 18 24 24 --stride 16 8 8 --q-tile 2 8 8 --kv-tile 2 4 8
  python -m jax_gna find 30 48 80 --window 18 24 24
  python -m jax_gna find 32768 --window 2048 --stride 256
  python -m jax_gna find 64 64 --target-sparsity 0.9
  python -m jax_gna bench                          # DESIGN §4 problems on a GPU, tiny ones on CPU
  python -m jax_gna bench --problem flux-4k-gna --baseline cudnn xla-mask --json out.json
  python -m jax_gna bench --shape 64 64 --window 13 --heads 4 --head-dim 64 --dtype float32
  python -m jax_gna bench --problem hunyuan-gna --mode bwd      # the backward pass alone
  python -m jax_gna draw 64 64 --window 13 --query 20 30 --out na.png
  python -m jax_gna draw 16 32 32 --window 4 8 8 --stride 2 4 4 --query 5 10 12 --out slice.png
"""


# ----------------------------------------------------------------------------------------
# Argument helpers.
# ----------------------------------------------------------------------------------------

def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "y", "t"):
        return True
    if low in ("0", "false", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (use 0/1 or true/false)")


def _per_axis(values: Sequence | None, rank: int, name: str, default=None):
    """A scalar or one value per axis, as the config expects (tuple or scalar)."""
    if values is None:
        return default
    if len(values) == 1:
        return values[0]
    if len(values) != rank:
        raise ValueError(f"--{name} got {len(values)} values for {rank} spatial axes "
                         "(give one value, or one per axis)")
    return tuple(values)


def _add_config_args(p: argparse.ArgumentParser, window_required: bool = True) -> None:
    p.add_argument("shape", type=int, nargs="+", help="spatial shape (1 to 3 ints)")
    p.add_argument("--window", type=int, nargs="+", required=window_required,
                   help="window (kernel) size per axis, or one for all; -1 = whole axis")
    p.add_argument("--stride", type=int, nargs="+", help="stride per axis (default 1)")
    p.add_argument("--dilation", type=int, nargs="+", help="dilation per axis (default 1)")
    p.add_argument("--causal", type=_bool, nargs="+", help="causal flag per axis (0/1)")


def _add_tile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--q-tile", type=int, nargs="+", help="Q tile shape (default: cuda's)")
    p.add_argument("--kv-tile", type=int, nargs="+", help="KV tile shape (default: cuda's)")
    p.add_argument("--head-dim", type=int, default=128, help="selects default tiles")
    p.add_argument("--arch", default="sm80", help="selects default tiles (default sm80)")


def _config(args):
    from jax_gna.config import GNAConfig
    rank = len(args.shape)
    return GNAConfig(kernel_size=_per_axis(args.window, rank, "window"),
                     stride=_per_axis(args.stride, rank, "stride", 1),
                     dilation=_per_axis(args.dilation, rank, "dilation", 1),
                     is_causal=_per_axis(args.causal, rank, "causal", False))


def _tiles(args) -> dict:
    return dict(q_tile_shape=None if args.q_tile is None else tuple(args.q_tile),
                kv_tile_shape=None if args.kv_tile is None else tuple(args.kv_tile),
                head_dim=args.head_dim, arch=args.arch)


def _device_line() -> str:
    import jax
    dev = jax.devices()[0]
    return (f"jax {jax.__version__} | backend {jax.default_backend()} | device "
            f"{getattr(dev, 'device_kind', dev)} x{jax.device_count()}")


def _median_ms(fn, args, reps: int = 5) -> float:
    import jax
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _rel_err(a, b) -> float:
    """max |a - b| / max |b| in float64 (b is the reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


#: Relative tolerance (max abs error over max abs reference) per input dtype.
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-2, "bfloat16": 4e-2}


# ----------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    """Runs GNA on an embedded 64x64-token problem, checks it, times it, simulates it."""
    import jax
    import jax.numpy as jnp
    import jax_gna

    print(_device_line())
    print(f"implementations available here: {', '.join(jax_gna.available_implementations())}")
    impl, dtype = _pick_demo_implementation(args.implementation)
    shape, heads, head_dim = (64, 64), 4, 64
    print(f"problem: B=1, {shape[0]}x{shape[1]} tokens, {heads} heads, head_dim {head_dim}, "
          f"{jnp.dtype(dtype).name}; implementation {impl!r}\n")
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    full = (1, *shape, heads, head_dim)
    q, k, v = (jax.random.normal(key, full, jnp.float32).astype(dtype) for key in (kq, kk, kv))
    configs = [("neighborhood attention, window 13x13",
                jax_gna.GNAConfig(kernel_size=(13, 13))),
               ("strided GNA, window 24x16, stride 8x16",
                jax_gna.GNAConfig(kernel_size=(24, 16), stride=(8, 16)))]
    ok = True
    for title, cfg in configs:
        print(f"== {title}: {cfg}")
        gna = jax.jit(lambda q, k, v, cfg=cfg: jax_gna.attention(q, k, v, cfg,
                                                                  implementation=impl))
        ref = jax.jit(lambda q, k, v, cfg=cfg: jax_gna.attention(
            q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), cfg,
            implementation="reference"))
        start = time.perf_counter()
        out = jax.block_until_ready(gna(q, k, v))
        first_ms = (time.perf_counter() - start) * 1e3
        expected = jax.block_until_ready(ref(q, k, v))
        err = _rel_err(out, expected)
        tol = TOLERANCE[jnp.dtype(dtype).name]
        passed = err <= tol
        ok &= passed
        gna_ms, ref_ms = _median_ms(gna, (q, k, v)), _median_ms(ref, (q, k, v), reps=3)
        print(f"   check vs reference: max|out-ref|/max|ref| = {err:.2e} (tolerance {tol:.0e})"
              f" {'OK' if passed else 'FAILED'}")
        print(f"   time: {impl} {gna_ms:.2f} ms (first call incl. compile {first_ms:.0f} ms); "
              f"dense masked reference {ref_ms:.2f} ms -> {ref_ms / gna_ms:.1f}x")
        sim = jax_gna.simulate(shape, cfg, head_dim=head_dim)
        print("   simulator:\n" + "\n".join("     " + line
                                           for line in sim.summary().splitlines()))
        print()
    print("demo: all checks passed" if ok else "demo: CHECK FAILED")
    return 0 if ok else 1


def _pick_demo_implementation(name: str | None):
    """The implementation and dtype the demo uses: the best one here, bf16 on GPUs."""
    import jax
    import jax.numpy as jnp
    from jax_gna import api
    candidates = [n for n in api.available_implementations() if n != "reference"]
    if name is not None:
        candidates = [name]
    dtypes = [jnp.bfloat16, jnp.float32] if jax.default_backend() == "gpu" else [jnp.float32]
    for impl in candidates:
        for dtype in dtypes:
            if jnp.dtype(dtype).name in api.implementation_dtypes(impl):
                return impl, dtype
    raise ValueError(f"no implementation among {candidates} accepts {dtypes}")


# ----------------------------------------------------------------------------------------
# check
# ----------------------------------------------------------------------------------------

#: (name, spatial shape, GNAConfig kwargs, heads, kv heads, head dim)
CHECK_CASES = (
    ("1d-dil-stride", (40,), dict(kernel_size=9, stride=3, dilation=2), 4, 2, 16),
    ("1d-causal", (33,), dict(kernel_size=8, stride=2, is_causal=True), 2, 2, 16),
    ("2d-dil", (12, 10), dict(kernel_size=(5, 4), stride=(2, 4), dilation=(2, 1)), 2, 1, 32),
    ("2d-causal", (9, 11), dict(kernel_size=(3, 5), is_causal=(True, False)), 2, 2, 16),
    ("3d-gqa", (6, 5, 7), dict(kernel_size=(3, 2, 4), stride=(1, 2, 2), dilation=(1, 2, 1)),
     4, 1, 16),
)


def cmd_check(args) -> int:
    """Compares every available implementation with the reference, forward and gradients."""
    import jax_gna

    print(_device_line())
    impls = args.implementation or [n for n in jax_gna.available_implementations()
                                    if n != "reference"]
    print(f"checking {', '.join(impls)} against the float32 reference "
          f"(relative error = max|x-ref|/max|ref|)\n")
    head = (f"{'implementation':<14} {'case':<14} {'dtype':<9} {'out':>8} {'lse':>8} "
            f"{'dq':>8} {'dk':>8} {'dv':>8}  result")
    print(head + "\n" + "-" * len(head))
    cases = CHECK_CASES
    if args.case:
        known = {c[0] for c in CHECK_CASES}
        unknown = sorted(set(args.case) - known)
        if unknown:
            raise ValueError(f"--case {unknown} unknown; choose from {sorted(known)}")
        cases = [c for c in CHECK_CASES if c[0] in args.case]
    failures = 0
    for impl in impls:
        for name, shape, kw, h, h_kv, d in cases:
            cfg = jax_gna.GNAConfig(**kw)
            try:
                errs, dtype = _check_case(impl, shape, cfg, h, h_kv, d)
            except Exception as e:  # report and continue with the other cases
                failures += 1
                print(f"{impl:<14} {name:<14} {'':<9} ERROR {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:80] if str(e) else ''}")
                continue
            tol = TOLERANCE[dtype]
            # Gradients go through one more reduction: allow twice the forward tolerance.
            passed = all(e <= (tol if i < 2 else 2 * tol) for i, e in enumerate(errs))
            failures += not passed
            print(f"{impl:<14} {name:<14} {dtype:<9} "
                  + " ".join(f"{e:>8.1e}" for e in errs)
                  + f"  {'ok' if passed else 'FAIL'}")
    print(f"\n{'all passed' if not failures else f'{failures} FAILED'}")
    return 0 if not failures else 1


def _check_case(impl, shape, cfg, heads, kv_heads, head_dim):
    """Relative errors (out, lse, dq, dk, dv) of `impl` against the reference."""
    import jax
    import jax.numpy as jnp
    import jax_gna

    keys = jax.random.split(jax.random.key(sum(shape) * 7 + heads), 4)
    q = jax.random.normal(keys[0], (2, *shape, heads, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (2, *shape, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (2, *shape, kv_heads, head_dim), jnp.float32)
    ct = jax.random.normal(keys[3], q.shape, jnp.float32)
    accepted = jax_gna.api.implementation_dtypes(impl)
    dtype = jnp.float32 if "float32" in accepted else jnp.bfloat16
    q, k, v = (x.astype(dtype) for x in (q, k, v))

    def run(name, q, k, v):
        def loss(q, k, v):
            out, lse = jax_gna.attention(q, k, v, cfg, implementation=name, return_lse=True)
            return jnp.sum(out.astype(jnp.float32) * ct), (out, lse)
        grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out, lse, *grads

    got = run(impl, q, k, v)
    want = run("reference", *(x.astype(jnp.float32) for x in (q, k, v)))
    return [_rel_err(g, w) for g, w in zip(got, want)], jnp.dtype(dtype).name


# ----------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    """Times implementations against dense attention; prints a table and writes JSON."""
    from jax_gna import bench
    from jax_gna.config import GNAConfig

    problems = [bench.get_problem(n) for n in (args.problem or [])]
    if args.shape:
        if args.window is None:
            raise ValueError("--window is required with --shape")
        rank = len(args.shape)
        cfg = GNAConfig(kernel_size=_per_axis(args.window, rank, "window"),
                        stride=_per_axis(args.stride, rank, "stride", 1),
                        dilation=_per_axis(args.dilation, rank, "dilation", 1),
                        is_causal=_per_axis(args.causal, rank, "causal", False))
        cfg.resolve(tuple(args.shape))
        name = "x".join(map(str, args.shape)) + "-k" + "x".join(map(str, args.window))
        problems.append(bench.Problem(name, tuple(args.shape), cfg, batch=args.batch,
                                      heads=args.heads, kv_heads=args.kv_heads,
                                      head_dim=args.head_dim, dtype=args.dtype))
    if not problems:
        problems = list(bench.default_problems())
    baselines = None if args.baseline is None else [b for b in args.baseline if b != "none"]
    print(_device_line())
    records = bench.run(problems, args.impl, baselines, args.mode, reps=args.reps,
                        min_time=args.min_time, progress=not args.no_progress)
    print(bench.format_table(records))
    if args.json:
        bench.write_json(args.json, records)
        print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in records) else 1


# ----------------------------------------------------------------------------------------
# sim / find
# ----------------------------------------------------------------------------------------

def cmd_sim(args) -> int:
    """Prints the simulator's prediction for one configuration."""
    import dataclasses
    from jax_gna.simulator import simulate

    start = time.perf_counter()
    result = simulate(tuple(args.shape), _config(args), **_tiles(args))
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=1))
        return 0
    print(result.summary())
    if args.q_tile is None and args.kv_tile is None:
        _print_tile_menu(tuple(args.shape), _config(args), args, result)
        if args.arch != "xla":  # the jnp path differentiates its own forward
            _print_backward_tiles(tuple(args.shape), _config(args), args, result)
    print(f"(simulated in {elapsed * 1e3:.1f} ms)")
    return 0


def _print_tile_menu(shape, cfg, args, result) -> None:
    """Where the rank's tile menu has several candidates, each with its visited pairs, whether
    its KV tile divides the axes, and which one is the default
    (`geometry.default_tile_shapes`)."""
    from jax_gna import geometry

    axes = cfg.resolve(shape)
    menu = geometry.tile_menu(axes, args.head_dim, args.arch)
    if len(menu) < 2:
        return
    print("tile menu         (the default is the first of least cost: its tile pairs, weighted "
          "up where KV rows are gathered)")
    default = menu.index((result.q_tile_shape, result.kv_tile_shape))
    for i, (q_tile, kv_tile) in enumerate(menu):
        pairs = geometry.visited_tile_pairs(axes, q_tile, kv_tile)
        gathered = "" if geometry.kv_tiles_divide(axes, kv_tile) else "  (KV rows gathered)"
        mark = "  <- default" if i == default else ""
        print(f"  Q {q_tile}  KV {kv_tile}  {pairs} pairs{gathered}{mark}")


def _print_backward_tiles(shape, cfg, args, result) -> None:
    """Per backward kernel family, its tiles (`geometry.backward_tile_shapes`) and their cost
    (`geometry.backward_tile_cost`: visited pairs of its dK/dV CTAs, in 128-row CTA pairs)."""
    from jax_gna import geometry

    axes = cfg.resolve(shape)
    forward = (result.q_tile_shape, result.kv_tile_shape)
    for i, kernels in enumerate(geometry.BACKWARD_KERNELS):
        tiles = geometry.backward_tile_shapes(axes, args.head_dim, args.arch, kernels=kernels)
        cost = geometry.backward_tile_cost(axes, *tiles, kernels=kernels)
        head = "backward tiles    " if i == 0 else " " * 18
        if tiles == forward:
            print(f"{head}{kernels + ':':7}the forward's (cost {cost:.0f})")
        else:
            was = geometry.backward_tile_cost(axes, *forward, kernels=kernels)
            print(f"{head}{kernels + ':':7}Q {tiles[0]}  KV {tiles[1]} (cost {cost:.0f}, the "
                  f"forward's {was:.0f})")


def cmd_find(args) -> int:
    """Lists perfectly block-sparse configurations near the request."""
    from jax_gna.simulator import find_configs

    rank = len(args.shape)
    start = time.perf_counter()
    found = find_configs(
        tuple(args.shape), window=_per_axis(args.window, rank, "window"),
        stride=_per_axis(args.stride, rank, "stride"), target_sparsity=args.target_sparsity,
        top=args.top, dilation=_per_axis(args.dilation, rank, "dilation", 1),
        is_causal=_per_axis(args.causal, rank, "causal", False), **_tiles(args))
    elapsed = time.perf_counter() - start
    if not found:
        print("no perfectly block-sparse configuration with these tiles; try other tile "
              "shapes (--q-tile/--kv-tile) or a non-causal layout")
        print(f"(searched in {elapsed:.2f} s)")
        return 1
    r0 = found[0].result
    print(f"tiles: Q {r0.q_tile_shape}, KV {r0.kv_tile_shape}")
    head = (f"{'window':<18} {'stride':<16} {'distance':>8} {'FLOP bound':>10} "
            f"{'tile speedup':>12} {'sparsity':>8}")
    print(head + "\n" + "-" * len(head))
    for f in found:
        r = f.result
        print(f"{str(f.window):<18} {str(f.stride):<16} {f.distance:>8.3f} "
              f"{r.flop_speedup:>9.3f}x {r.tile_speedup:>11.3f}x {r.sparsity:>8.4f}")
    print(f"(searched in {elapsed:.2f} s; all listed are perfectly block-sparse)")
    return 0


# ----------------------------------------------------------------------------------------
# draw
# ----------------------------------------------------------------------------------------

#: RGB colours of the token map.
COLORS = {"full": (0.22, 0.62, 0.27), "partial_seen": (0.87, 0.47, 0.10),
          "partial_masked": (0.99, 0.86, 0.66)}


def cmd_draw(args) -> int:
    """Writes a PNG of one query's neighbourhood and its Q tile's visited KV tiles."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        print("error: draw needs matplotlib (an optional dependency): "
              "pip install matplotlib", file=sys.stderr)
        return 2
    from jax_gna.simulator import simulate, token_map

    shape = tuple(args.shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"draw needs a 2-D or 3-D shape, got {shape}")
    cfg = _config(args)
    query = tuple(args.query) if args.query else tuple(n // 2 for n in shape)
    maps = token_map(shape, cfg, query, **_tiles(args))
    sim = simulate(shape, cfg, **_tiles(args))
    title_slice = ""
    if len(shape) == 3:
        z = query[0] if args.slice is None else args.slice
        if not 0 <= z < shape[0]:
            raise ValueError(f"--slice={z} must be in [0, {shape[0]})")
        maps = {n: m[z] for n, m in maps.items()}
        title_slice = f", slice {z} of axis 0 (query at {query[0]})"
        point = query[1:]
    else:
        point = query
    # A full tile's keys are seen by every query of the Q tile, so full implies neighbourhood.
    img = np.ones((*maps["visited"].shape, 3))
    img[maps["visited"]] = COLORS["partial_masked"]
    img[maps["visited"] & maps["neighborhood"]] = COLORS["partial_seen"]
    img[maps["full"]] = COLORS["full"]
    rows, cols = img.shape[:2]
    size = max(3.0, min(7.0, 0.12 * max(rows, cols)))
    fig, ax = plt.subplots(figsize=(size * cols / max(rows, cols) + 2.2,
                                    size * rows / max(rows, cols) + 1.0))
    ax.imshow(img, interpolation="nearest", origin="upper")
    qy, qx = np.nonzero(maps["q_tile"])
    ax.scatter(qx, qy, s=max(2.0, 600.0 / max(rows, cols)), c="black", marker=".",
               linewidths=0, label="_")
    ax.scatter([point[1]], [point[0]], s=max(20.0, 2400.0 / max(rows, cols)), c="red",
               marker="*", linewidths=0)
    _draw_tile_grid(ax, cfg.resolve(shape)[-2:], sim.kv_tile_shape[-2:], rows, cols)
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    handles = [Patch(color=COLORS["full"], label="key in a full KV tile (no mask)"),
               Patch(color=COLORS["partial_seen"],
                     label="key the query sees, in a partial KV tile"),
               Patch(color=COLORS["partial_masked"],
                     label="key it does not see, in a partial KV tile"),
               Patch(facecolor="white", edgecolor="grey", label="KV tile not visited"),
               plt.Line2D([], [], color="black", marker=".", linestyle="",
                          label="queries of the Q tile"),
               plt.Line2D([], [], color="red", marker="*", linestyle="", label="query")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
              frameon=False)
    extra = "".join([f" dilation {cfg.dilation}" if cfg.dilation != 1 else "",
                     f" causal {cfg.is_causal}" if cfg.is_causal else ""])
    ax.set_title(
        f"{'x'.join(map(str, shape))} window {cfg.kernel_size} stride {cfg.stride}{extra}"
        f"{title_slice}\nQ tile {sim.q_tile_shape}, KV tile {sim.kv_tile_shape}: "
        f"tile speedup {sim.tile_speedup:.2f}x of {sim.flop_speedup:.2f}x "
        f"({'block-sparse' if sim.block_sparse else f'{sim.partial_fraction:.0%} partial'})",
        fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=args.dpi, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


def _draw_tile_grid(ax, axes, kv_tile, rows, cols) -> None:
    """KV-tile boundaries (token coordinates; only for undilated axes)."""
    (ay, ax_), (ty, tx) = axes, kv_tile
    if ay.dilation == 1:
        for y in range(ty, rows, ty):
            ax.axhline(y - 0.5, color="grey", linewidth=0.4)
    if ax_.dilation == 1:
        for x in range(tx, cols, tx):
            ax.axvline(x - 0.5, color="grey", linewidth=0.4)


# ----------------------------------------------------------------------------------------
# Parser and entry point.
# ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m jax_gna``."""
    parser = argparse.ArgumentParser(
        prog="python -m jax_gna", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generalized Neighborhood Attention for JAX: demo, correctness check, "
                    "benchmarks, tile simulator, block-sparse config finder, drawings.",
        epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run GNA on an embedded 64x64 problem, check, time it",
                       description=cmd_demo.__doc__)
    p.add_argument("--implementation", help="force one implementation (default: the best)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("check", help="compare implementations with the reference here",
                       description=cmd_check.__doc__)
    p.add_argument("--implementation", nargs="+", help="implementations (default: all)")
    p.add_argument("--case", nargs="+", metavar="NAME",
                   help="cases to run (default: all): "
                        + ", ".join(repr(c[0]) for c in CHECK_CASES))
    p.set_defaults(func=cmd_check)

    from jax_gna import bench
    problems = sorted({**bench.PROBLEMS, **bench.CPU_PROBLEMS})
    p = sub.add_parser(
        "bench", help="time implementations against dense attention, write JSON",
        description=(cmd_bench.__doc__ or "") + " Named problems: " + ", ".join(problems)
        + ". Without --problem/--shape: DESIGN §4's six on a GPU, tiny ones elsewhere.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--problem", nargs="+", metavar="NAME", help="named problems")
    p.add_argument("--shape", type=int, nargs="+", help="ad-hoc problem: spatial shape")
    p.add_argument("--window", type=int, nargs="+", help="ad-hoc problem: window")
    p.add_argument("--stride", type=int, nargs="+", help="ad-hoc problem: stride")
    p.add_argument("--dilation", type=int, nargs="+", help="ad-hoc problem: dilation")
    p.add_argument("--causal", type=_bool, nargs="+", help="ad-hoc problem: causal flags")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16",
                   choices=("bfloat16", "float16", "float32"))
    p.add_argument("--impl", nargs="+", help="GNA implementations (default: all available)")
    p.add_argument("--baseline", nargs="+", choices=(*bench.BASELINES, "none"),
                   help="dense baselines (default: cudnn on GPU, xla-mask elsewhere)")
    p.add_argument("--mode", nargs="+", choices=bench.MODES, default=list(bench.DEFAULT_MODES),
                   help=f"what to time (default: {' '.join(bench.DEFAULT_MODES)}); bwd: the "
                        "backward pass alone, after one untimed forward")
    p.add_argument("--reps", type=int, default=5, help="timing repetitions (median)")
    p.add_argument("--min-time", type=float, default=0.1,
                   help="seconds of back-to-back calls per repetition")
    p.add_argument("--json", default="gna_bench.json", help="output path ('' for none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sim", help="simulate tile-level speedup of one configuration",
                       description=cmd_sim.__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    _add_tile_args(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser("find", help="find perfectly block-sparse configurations",
                       description=cmd_find.__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p, window_required=False)
    _add_tile_args(p)
    p.add_argument("--target-sparsity", type=float,
                   help="wanted fraction of dense scores skipped, in (0, 1)")
    p.add_argument("--top", type=int, default=10, help="how many to list")
    p.set_defaults(func=cmd_find)

    p = sub.add_parser("draw", help="PNG of a neighbourhood and visited KV tiles",
                       description=cmd_draw.__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    _add_tile_args(p)
    p.add_argument("--query", type=int, nargs="+", help="query coordinates (default centre)")
    p.add_argument("--slice", type=int, help="3-D: index along axis 0 to show "
                   "(default: the query's)")
    p.add_argument("--out", default="gna.png", help="output PNG path")
    p.add_argument("--dpi", type=int, default=100)
    p.set_defaults(func=cmd_draw)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parses `argv` (default ``sys.argv[1:]``) and runs the subcommand; returns its status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

