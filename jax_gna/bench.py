"""The benchmark harness: GNA implementations against dense attention, in one process.

What is timed is the whole call as a user makes it, in three modes:

* ``fwd``: ``jax.jit`` of `jax_gna.attention` (layout work included);
* ``fwd+bwd``: ``jax.jit(jax.grad(sum(out * cotangent)))`` with respect to ``q, k, v``;
* ``bwd``: the backward pass alone. The forward runs once, untimed, as ``jax.vjp`` inside a
  ``jax.jit`` that returns the vjp function (a pytree whose leaves are the residuals); what
  is timed is ``jax.jit(lambda vjp_fn, ct: vjp_fn(ct))`` called with ``(vjp_fn, ct)``, so
  the residuals are arguments of the timed program (not constants) and it returns
  ``(dq, dk, dv)``.

Dense baselines get the same treatment through `jax.nn.dot_product_attention`:

* ``cudnn``: dense unmasked attention, ``implementation="cudnn"`` (GPU only);
* ``xla-mask``: ``implementation="xla"`` with the equivalent boolean GNA mask (built once
  with `geometry.neighborhood_mask`, passed as an argument); it computes every score.

Timing (identical for every contestant): compile and warm up, pick an iteration count ``n``
so that ``n`` back-to-back calls take at least `min_time` seconds, then take the median over
`reps` repetitions of (``n`` calls, one ``block_until_ready``) / ``n``. ``n`` is capped
(`max_iters`); calls too short to fill `min_time` within the cap get more repetitions instead
(up to `max_reps`), so that host hiccups do not decide the median of sub-millisecond calls.

Effective TFLOP/s (DESIGN.md §4) divides the FLOPs GNA needs,
``4·B·H·D·Σ|neighbourhood|`` forward, 2.5× that for backward and 3.5× for forward+backward
(`MODE_FLOP_FACTORS`), by the measured time; dense rows also report their own FLOP rate
(``4·B·H·N²·D``, same multipliers).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import statistics
import sys
import time
from typing import Callable, Iterable, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from jax_gna import api, geometry
from jax_gna.config import GNAConfig
from jax_gna.simulator import simulate

#: Backward FLOPs over forward FLOPs.
BWD_FACTOR = 2.5
#: Forward+backward FLOPs over forward FLOPs (1 + `BWD_FACTOR`).
FWD_BWD_FACTOR = 1.0 + BWD_FACTOR
#: FLOPs of each mode over forward FLOPs.
MODE_FLOP_FACTORS: dict[str, float] = {"fwd": 1.0, "fwd+bwd": FWD_BWD_FACTOR,
                                       "bwd": BWD_FACTOR}
#: Dense baselines this harness knows.
BASELINES = ("cudnn", "xla-mask")
#: Timing modes this harness knows (see the module docstring).
MODES = ("fwd", "fwd+bwd", "bwd")
#: Modes `run` and the command line time when none are given.
DEFAULT_MODES = ("fwd", "fwd+bwd")
#: Largest B*H*N*N score count the masked dense baseline is attempted for: it materialises
#: the scores; 8.6e9 of them fit an 80 GB card in bf16 for the forward pass.
MAX_MASKED_SCORES = 1 << 33


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    Attributes:
      name: short identifier (used on the command line and in the JSON).
      spatial_shape: token layout.
      cfg: the GNA configuration.
      batch, heads, kv_heads, head_dim: attention shape (``kv_heads=None``: = heads).
      dtype: input dtype name.
    """

    name: str
    spatial_shape: tuple[int, ...]
    cfg: GNAConfig
    batch: int = 1
    heads: int = 24
    kv_heads: int | None = None
    head_dim: int = 128
    dtype: str = "bfloat16"

    @property
    def tokens(self) -> int:
        return math.prod(self.spatial_shape)

    def gna_flops(self, mode: str) -> float:
        """FLOPs GNA needs (the numerator of effective TFLOP/s)."""
        axes = self.cfg.resolve(self.spatial_shape)
        fwd = 4.0 * self.batch * self.heads * self.head_dim * geometry.neighborhood_size(axes)
        return fwd * flop_factor(mode)

    def dense_flops(self, mode: str) -> float:
        """FLOPs of dense attention over all ``N²`` pairs."""
        fwd = 4.0 * self.batch * self.heads * self.head_dim * float(self.tokens) ** 2
        return fwd * flop_factor(mode)


def flop_factor(mode: str) -> float:
    """FLOPs of `mode` over forward FLOPs (`MODE_FLOP_FACTORS`).

    Raises:
      ValueError: unknown mode.
    """
    if mode not in MODE_FLOP_FACTORS:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    return MODE_FLOP_FACTORS[mode]


def _p(name, shape, window, stride, heads=24, **kw) -> Problem:
    return Problem(name, shape, GNAConfig(window, stride), heads=heads, **kw)


#: DESIGN.md §4's six problems (bf16, B=1, D=128), plus issue 2's xla acceptance problem.
PROBLEMS: dict[str, Problem] = {p.name: p for p in (
    _p("flux-4k-gna", (256, 256), (80, 80), (16, 16)),
    _p("hunyuan-gna", (30, 48, 80), (18, 24, 24), (16, 8, 8)),
    _p("flux-4k-na", (256, 256), (80, 80), (1, 1)),
    _p("hunyuan-na", (30, 48, 80), (18, 24, 24), (1, 1, 1)),
    _p("1d-32k-gna", (32768,), 2048, 256, heads=1),
    _p("1d-32k-na", (32768,), 2048, 1, heads=1),
    _p("xla-16k-na", (128, 128), (32, 32), (1, 1)),
)}
#: The six problems of DESIGN.md §4, in its order.
DESIGN_PROBLEMS = ("flux-4k-gna", "hunyuan-gna", "flux-4k-na", "hunyuan-na", "1d-32k-gna",
                   "1d-32k-na")
#: Small problems for CPU runs (float32, a few heads).
CPU_PROBLEMS: dict[str, Problem] = {p.name: p for p in (
    _p("tiny-2d-gna", (32, 32), (16, 16), (8, 8), heads=2, head_dim=32, dtype="float32"),
    _p("tiny-2d-na", (32, 32), (9, 9), (1, 1), heads=2, head_dim=32, dtype="float32"),
    _p("tiny-1d-gna", (1024,), 128, 32, heads=2, head_dim=32, dtype="float32"),
)}


def on_gpu() -> bool:
    """True if JAX's default backend is a GPU."""
    return jax.default_backend() == "gpu"


def default_problems() -> tuple[Problem, ...]:
    """The six §4 problems on a GPU, the tiny CPU problems elsewhere."""
    if on_gpu():
        return tuple(PROBLEMS[n] for n in DESIGN_PROBLEMS)
    return tuple(CPU_PROBLEMS.values())


def get_problem(name: str) -> Problem:
    """A named problem from `PROBLEMS` or `CPU_PROBLEMS`.

    Raises:
      ValueError: unknown name (the message lists the known ones).
    """
    known = {**PROBLEMS, **CPU_PROBLEMS}
    if name not in known:
        raise ValueError(f"problem={name!r} is unknown; known problems: {sorted(known)}")
    return known[name]


def default_baselines() -> tuple[str, ...]:
    """``("cudnn",)`` on a GPU, ``("xla-mask",)`` elsewhere."""
    return ("cudnn",) if on_gpu() else ("xla-mask",)


def default_implementations() -> tuple[str, ...]:
    """Every available implementation except the dense `reference`."""
    return tuple(n for n in api.available_implementations() if n != "reference")


# ----------------------------------------------------------------------------------------
# Inputs and the functions under test.
# ----------------------------------------------------------------------------------------

def make_inputs(problem: Problem, seed: int = 0) -> tuple[jax.Array, ...]:
    """Random ``(q, k, v, cotangent)`` in the problem's layout and dtype (never zeros)."""
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    kv_heads = problem.kv_heads or problem.heads
    dtype = jnp.dtype(problem.dtype)
    q_shape = (problem.batch, *problem.spatial_shape, problem.heads, problem.head_dim)
    kv_shape = (problem.batch, *problem.spatial_shape, kv_heads, problem.head_dim)
    q = jax.random.normal(kq, q_shape, jnp.float32).astype(dtype)
    k = jax.random.normal(kk, kv_shape, jnp.float32).astype(dtype)
    v = jax.random.normal(kv, kv_shape, jnp.float32).astype(dtype)
    ct = jax.random.normal(kc, q_shape, jnp.float32).astype(dtype)
    return q, k, v, ct


def _with_grad(f: Callable, mode: str) -> Callable:
    """Jitted forward ``(q, k, v, ct, *extra) -> out`` or forward+backward ``-> (dq, dk, dv)``.

    Raises:
      ValueError: `mode` is neither ``"fwd"`` nor ``"fwd+bwd"`` (``"bwd"`` needs the forward
        run first: see `prepare_call`).
    """
    if mode == "fwd":
        return jax.jit(lambda q, k, v, ct, *extra: f(q, k, v, *extra))
    if mode != "fwd+bwd":
        raise ValueError(f"mode={mode!r}: a single jitted function exists for 'fwd' and "
                         "'fwd+bwd' only; use prepare_call for 'bwd'")

    def loss(q, k, v, ct, *extra):
        return jnp.sum(f(q, k, v, *extra).astype(jnp.float32) * ct.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _vjp_prepare(f: Callable, args: Sequence) -> tuple:
    """Runs the forward once; returns ``(vjp_fn, ct)`` for the timed backward.

    ``jax.vjp`` runs inside a ``jax.jit`` that returns the vjp function: a pytree whose leaves
    are the residual arrays, so it comes out of one jitted call and goes into the next as an
    argument. ``ct`` is cast to the output dtype, which is what ``fwd+bwd``'s float32 loss
    hands the backward pass.
    """
    def forward_and_vjp(q, k, v, ct, *extra):
        out, vjp_fn = jax.vjp(lambda q, k, v: f(q, k, v, *extra), q, k, v)
        return vjp_fn, ct.astype(out.dtype)

    return jax.block_until_ready(jax.jit(forward_and_vjp)(*args))


def prepare_call(f: Callable, mode: str, args: Sequence) -> tuple[Callable, tuple]:
    """The callable to time for one mode, and its arguments.

    Args:
      f: the raw forward ``f(q, k, v, *extra) -> out`` (`_gna_forward`, `_dense_forward`).
      mode: one of `MODES`.
      args: ``(q, k, v, ct, *extra)``.

    Returns:
      ``(fn, fn_args)``: for ``fwd`` and ``fwd+bwd``, `_with_grad`'s jitted function and
      `args`; for ``bwd``, ``jax.jit(lambda vjp_fn, ct: vjp_fn(ct))`` and ``(vjp_fn, ct)``,
      after running the forward once (`_vjp_prepare`; ``extra`` goes to that forward only).
      ``fn(*fn_args)`` is ``out`` for ``fwd`` and ``(dq, dk, dv)`` otherwise.

    Raises:
      ValueError: unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    if mode != "bwd":
        return _with_grad(f, mode), tuple(args)
    return jax.jit(lambda vjp_fn, ct: vjp_fn(ct)), tuple(_vjp_prepare(f, args))


def _gna_forward(problem: Problem, implementation: str) -> Callable:
    """The raw GNA forward ``f(q, k, v) -> out`` of one implementation (not jitted)."""
    cfg = problem.cfg
    return lambda q, k, v: api.attention(q, k, v, cfg, implementation=implementation)


def _dense_forward(problem: Problem, baseline: str) -> Callable:
    """The raw dense forward ``f(q, k, v, *extra) -> out`` of a baseline (not jitted).

    Layout work (flattening the spatial axes) is inside it, as for GNA. The ``xla-mask``
    forward takes the ``[N, N]`` mask as a fourth argument.

    Raises:
      ValueError: unknown baseline.
    """
    b, n = problem.batch, problem.tokens

    def flat(x):
        return x.reshape(b, n, *x.shape[-2:])

    if baseline == "cudnn":
        def f(q, k, v):
            out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v),
                                               implementation="cudnn")
            return out.reshape(q.shape)
    elif baseline == "xla-mask":
        def f(q, k, v, mask):
            out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v),
                                               mask=mask[None, None], implementation="xla")
            return out.reshape(q.shape)
    else:
        raise ValueError(f"baseline={baseline!r} is unknown; choose from {BASELINES}")
    return f


def gna_function(problem: Problem, implementation: str, mode: str) -> Callable:
    """The jitted GNA call a user makes, for one implementation and mode (``fwd``,
    ``fwd+bwd``; ``bwd`` needs `prepare_call`)."""
    return _with_grad(_gna_forward(problem, implementation), mode)


def dense_function(problem: Problem, baseline: str, mode: str) -> Callable:
    """The jitted dense `jax.nn.dot_product_attention` call for a baseline and mode
    (``fwd``, ``fwd+bwd``; ``bwd`` needs `prepare_call`).

    Layout work (flattening the spatial axes) is inside the jitted call, as for GNA.
    The ``xla-mask`` function takes the ``[N, N]`` mask as a fifth argument.
    """
    return _with_grad(_dense_forward(problem, baseline), mode)


def baseline_unavailable(problem: Problem, baseline: str) -> str | None:
    """Why a baseline cannot run here for this problem, or None."""
    if baseline == "cudnn":
        if not on_gpu():
            return "cudnn needs a GPU"
        if problem.dtype not in ("bfloat16", "float16"):
            return "cudnn needs bfloat16 or float16 inputs"
    elif baseline == "xla-mask":
        scores = problem.batch * problem.heads * problem.tokens ** 2
        if scores > MAX_MASKED_SCORES:
            return (f"the masked dense baseline would materialise {scores:.3g} scores "
                    f"(limit {MAX_MASKED_SCORES:.3g})")
    else:
        return f"unknown baseline {baseline!r}; known: {BASELINES}"
    return None


# ----------------------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------------------

def _seconds_of_one_call(fn: Callable, args: Sequence) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return max(time.perf_counter() - start, 1e-6)


def time_function(fn: Callable, args: Sequence, *, reps: int = 5, min_time: float = 0.1,
                  max_iters: int = 100, max_reps: int = 15) -> dict[str, float]:
    """Median seconds per call of ``fn(*args)`` (see the module docstring for the method).

    Returns:
      ``{"seconds": median per-call time, "iters": calls per repetition, "reps": repetitions
      taken (at least `reps`), "compile_seconds": first call incl. compilation, "spread":
      (max - min) / median}``.
    """
    compile_s = _seconds_of_one_call(fn, args)
    once = _seconds_of_one_call(fn, args)
    if once * max_iters < min_time:  # a short call: one host hiccup would skew `iters`
        once = min(once, _seconds_of_one_call(fn, args), _seconds_of_one_call(fn, args))
    iters = int(min(max_iters, max(1, math.ceil(min_time / once))))
    if once * iters < min_time:
        # More back-to-back calls would keep more outputs alive in the dispatch queue: take
        # more repetitions instead, so that the median rests on ~reps * min_time of timing.
        # (once * iters < min_time, so this is at least `reps`.)
        reps = min(max(reps, max_reps), math.ceil(reps * min_time / (iters * once)))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / iters)
    med = statistics.median(samples)
    return {"seconds": med, "iters": iters, "reps": reps, "compile_seconds": compile_s,
            "spread": (max(samples) - min(samples)) / med}


class Progress:
    """A one-line text progress bar on `stream` (a line per step when not a terminal)."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 24):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = sys.stderr if stream is None else stream
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, label: str) -> None:
        """Announces the step about to run (and counts the previous one as done)."""
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} {label}"
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.done += 1

    def close(self) -> None:
        bar = "#" * self.width
        line = f"[{bar}] {self.total}/{self.total} done"
        self.stream.write(("\r" + line.ljust(120) + "\n") if self.tty else line + "\n")
        self.stream.flush()


# ----------------------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------------------

def _record(problem: Problem, contestant: str, kind: str, mode: str) -> dict:
    return {"problem": problem.name, "contestant": contestant, "kind": kind, "mode": mode,
            "spatial_shape": list(problem.spatial_shape),
            "window": _listify(problem.cfg.kernel_size),
            "stride": _listify(problem.cfg.stride),
            "dilation": _listify(problem.cfg.dilation),
            "is_causal": _listify(problem.cfg.is_causal),
            "batch": problem.batch, "heads": problem.heads,
            "kv_heads": problem.kv_heads or problem.heads, "head_dim": problem.head_dim,
            "dtype": problem.dtype}


def _listify(x):
    return list(x) if isinstance(x, tuple) else x


def run(problems: Iterable[Problem], implementations: Sequence[str] | None = None,
        baselines: Sequence[str] | None = None, modes: Sequence[str] = DEFAULT_MODES, *,
        reps: int = 5, min_time: float = 0.1, progress: bool = True,
        stream: TextIO | None = None) -> list[dict]:
    """Times every (problem, contestant, mode) and returns one record per measurement.

    Args:
      problems: what to run.
      implementations: GNA implementations (default `default_implementations()`).
      baselines: dense baselines (default `default_baselines()`); the first one that ran is
        the reference of each GNA row's ``ratio``.
      modes: any of `MODES` (default `DEFAULT_MODES`): ``"fwd"``, ``"fwd+bwd"`` and
        ``"bwd"``, the backward pass alone (the forward runs once before timing, inside the
        measurement's error handling; see the module docstring).
      reps, min_time: timing parameters (`time_function`).
      progress: print a progress bar on `stream` (default stderr).

    Returns:
      Records (dicts, JSON-ready) with ``ms``, ``effective_tflops``, ``tflops`` (the FLOPs the
      contestant itself performs: GNA's for GNA rows, dense for dense rows), for GNA rows
      ``ratios`` (baseline ms / ms, same mode, for every baseline that ran), ``ratio`` and
      ``ratio_baseline`` (the first of them), ``flop_bound`` and ``tile_speedup``
      (simulator); or ``error`` / ``skipped`` strings when a measurement could not be made.

    Raises:
      ValueError: unknown mode, baseline or implementation name.
    """
    problems = tuple(problems)
    implementations = tuple(default_implementations() if implementations is None
                            else implementations)
    baselines = tuple(default_baselines() if baselines is None else baselines)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {MODES}")
    for b in baselines:
        if b not in BASELINES:
            raise ValueError(f"baseline={b!r} is unknown; choose from {BASELINES}")
    known = api.available_implementations()
    for name in implementations:
        if name not in known:
            raise ValueError(f"implementation={name!r} is not available here; available: "
                             f"{known}")
    steps = len(problems) * len(modes) * (len(implementations) + len(baselines))
    bar = Progress(steps, stream) if progress else None
    records = []
    for problem in problems:
        sim = simulate(problem.spatial_shape, problem.cfg, head_dim=problem.head_dim)
        args = make_inputs(problem)
        mask = None
        for mode in modes:
            dense_ms: dict[str, float] = {}
            for baseline in baselines:
                if bar:
                    bar.step(f"{problem.name} {mode} {baseline}")
                rec = _record(problem, baseline, "dense", mode)
                reason = baseline_unavailable(problem, baseline)
                if reason:
                    rec["skipped"] = reason
                else:
                    extra = ()
                    if baseline == "xla-mask":
                        if mask is None:
                            mask = jnp.asarray(geometry.neighborhood_mask(
                                problem.spatial_shape, problem.cfg))
                        extra = (mask,)
                    prepare = functools.partial(_prepare, _dense_forward, problem, baseline,
                                                mode, (*args, *extra))
                    _measure(rec, prepare, problem.dense_flops(mode), problem.gna_flops(mode),
                             reps, min_time)
                    if "ms" in rec:
                        dense_ms[baseline] = rec["ms"]
                records.append(rec)
            for name in implementations:
                if bar:
                    bar.step(f"{problem.name} {mode} {name}")
                rec = _record(problem, name, "gna", mode)
                rec["flop_bound"] = sim.flop_speedup
                rec["tile_speedup"] = sim.tile_speedup
                prepare = functools.partial(_prepare, _gna_forward, problem, name, mode, args)
                _measure(rec, prepare, problem.gna_flops(mode), problem.gna_flops(mode), reps,
                         min_time)
                if dense_ms and "ms" in rec:
                    rec["ratios"] = {b: ms / rec["ms"] for b, ms in dense_ms.items()}
                    rec["ratio_baseline"] = next(iter(dense_ms))
                    rec["ratio"] = rec["ratios"][rec["ratio_baseline"]]
                records.append(rec)
        del mask
    if bar:
        bar.close()
    return records


def _prepare(builder: Callable, problem: Problem, contestant: str, mode: str,
             args: Sequence) -> tuple[Callable, tuple]:
    """`prepare_call` of ``builder(problem, contestant)``, the forward (built here, so that a
    failing builder is a failing contestant)."""
    return prepare_call(builder(problem, contestant), mode, args)


def _measure(rec: dict, prepare: Callable[[], tuple[Callable, Sequence]], own_flops: float,
             gna_flops: float, reps: int, min_time: float) -> None:
    """Times ``fn(*fn_args)``, ``(fn, fn_args) = prepare()``, into `rec`.

    Preparation (building the function; running the forward once for ``bwd``) and timing
    are in one ``try``: an exception becomes ``rec["error"]``, so the others still run.
    """
    try:
        fn, args = prepare()
        t = time_function(fn, args, reps=reps, min_time=min_time)
    except Exception as e:  # a contestant that fails is reported, the others still run
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        return
    rec["ms"] = t["seconds"] * 1e3
    rec["iters"], rec["reps"], rec["spread"] = t["iters"], t["reps"], t["spread"]
    rec["compile_s"] = t["compile_seconds"]
    rec["tflops"] = own_flops / t["seconds"] / 1e12
    rec["effective_tflops"] = gna_flops / t["seconds"] / 1e12


# ----------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------

def metadata() -> dict:
    """Device, software and date of a run (goes into the JSON)."""
    dev = jax.devices()[0]
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "device_count": jax.device_count(), "jax": jax.__version__,
            "numpy": np.__version__, "timing": "median over reps of n back-to-back jitted "
            "calls / n, after warm-up", "fwd_bwd_flop_factor": FWD_BWD_FACTOR,
            "bwd_flop_factor": BWD_FACTOR}


def write_json(path: str, records: Sequence[dict], meta: dict | None = None) -> None:
    """Writes ``{"meta": ..., "results": records}`` to `path`."""
    with open(path, "w") as f:
        json.dump({"meta": metadata() if meta is None else meta, "results": list(records)},
                  f, indent=1)


def format_table(records: Sequence[dict]) -> str:
    """A short fixed-width table: one row per record, one ratio column per baseline."""
    baselines = list(dict.fromkeys(r["contestant"] for r in records
                                   if r["kind"] == "dense" and "ms" in r))
    head = (f"{'problem':<14} {'mode':<7} {'contestant':<10} {'ms':>9} {'eff TF/s':>9} "
            f"{'TF/s':>8} {'bound':>6}" + "".join(f" {'vs ' + b:>12}" for b in baselines))
    lines = [head, "-" * len(head)]
    for r in records:
        if "ms" not in r:
            note = r.get("skipped") or r.get("error", "")
            lines.append(f"{r['problem']:<14} {r['mode']:<7} {r['contestant']:<10} "
                         f"{'-':>9}  {'skipped' if 'skipped' in r else 'ERROR'}: {note[:70]}")
            continue
        bound = f"{r['flop_bound']:.1f}x" if "flop_bound" in r else ""
        ratios = r.get("ratios", {})
        lines.append(f"{r['problem']:<14} {r['mode']:<7} {r['contestant']:<10} "
                     f"{_num(r['ms']):>9} {_num(r['effective_tflops']):>9} "
                     f"{_num(r['tflops']):>8} {bound:>6}"
                     + "".join(f" {f'{ratios[b]:.2f}x' if b in ratios else '':>12}"
                               for b in baselines))
    return "\n".join(lines)


def _num(x: float) -> str:
    """Three significant digits at least, without exponent for the usual range."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 0.01:
        return f"{x:.3f}"
    return f"{x:.2e}"
