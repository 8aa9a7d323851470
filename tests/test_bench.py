"""The benchmark harness: FLOP accounting, baselines equal to GNA, timing, records, JSON."""

import io
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_gna
from jax_gna import bench
from jax_gna.config import GNAConfig

SMALL = bench.Problem("small", (6, 7), GNAConfig((3, 4), (1, 2), (2, 1)), batch=2, heads=4,
                      kv_heads=2, head_dim=8, dtype="float32")


def test_flop_counts_follow_design_definition():
    mask = jax_gna.neighborhood_mask(SMALL.spatial_shape, SMALL.cfg)
    fwd = 4 * 2 * 4 * 8 * int(mask.sum())
    assert SMALL.gna_flops("fwd") == fwd
    assert SMALL.gna_flops("fwd+bwd") == 3.5 * fwd
    assert SMALL.dense_flops("fwd") == 4 * 2 * 4 * 8 * 42 ** 2
    assert SMALL.dense_flops("fwd+bwd") == 3.5 * SMALL.dense_flops("fwd")


def test_bwd_flops_are_two_and_a_half_forward():
    fwd = 4 * 2 * 4 * 8 * int(jax_gna.neighborhood_mask(SMALL.spatial_shape, SMALL.cfg).sum())
    assert SMALL.gna_flops("bwd") == 2.5 * fwd
    assert SMALL.dense_flops("bwd") == 2.5 * 4 * 2 * 4 * 8 * 42 ** 2
    assert bench.BWD_FACTOR == 2.5 and bench.metadata()["bwd_flop_factor"] == 2.5
    assert bench.MODES == ("fwd", "fwd+bwd", "bwd")
    assert bench.DEFAULT_MODES == ("fwd", "fwd+bwd")
    with pytest.raises(ValueError, match="mode='back'"):
        SMALL.gna_flops("back")


@pytest.mark.parametrize("name,bound", [
    ("flux-4k-gna", 10.24), ("hunyuan-gna", 100 / 9), ("flux-4k-na", 10.24),
    ("hunyuan-na", 100 / 9), ("1d-32k-gna", 16.0), ("1d-32k-na", 16.0)])
def test_design_problems(name, bound):
    """The six problems of DESIGN.md §4 with their FLOP-wise bounds (bf16, B=1, D=128)."""
    p = bench.get_problem(name)
    assert name in bench.DESIGN_PROBLEMS
    assert (p.dtype, p.batch, p.head_dim) == ("bfloat16", 1, 128)
    assert p.heads == (1 if name.startswith("1d") else 24)
    assert p.dense_flops("fwd") / p.gna_flops("fwd") == pytest.approx(bound, rel=1e-12)


def test_unknown_problem():
    with pytest.raises(ValueError, match="problem='nope'"):
        bench.get_problem("nope")


def _reference_grads(q, k, v, ct, cfg):
    def loss(q, k, v):
        out = jax_gna.attention(q, k, v, cfg, implementation="reference")
        return jnp.sum(out * ct)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def test_baseline_and_gna_functions_compute_gna():
    """The masked dense baseline and the timed GNA call both equal the reference."""
    q, k, v, ct = bench.make_inputs(SMALL, seed=3)
    for x in (q, k, v, ct):
        assert float(jnp.std(x)) > 0.5  # random, not zeros
    mask = jnp.asarray(jax_gna.neighborhood_mask(SMALL.spatial_shape, SMALL.cfg))
    want = jax.jit(lambda q, k, v: jax_gna.attention(q, k, v, SMALL.cfg,
                                                     implementation="reference"))(q, k, v)
    dense = bench.dense_function(SMALL, "xla-mask", "fwd")(q, k, v, ct, mask)
    gna = bench.gna_function(SMALL, "xla", "fwd")(q, k, v, ct)
    np.testing.assert_allclose(dense, want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(gna, want, atol=2e-5, rtol=2e-5)
    want_g = _reference_grads(q, k, v, ct, SMALL.cfg)
    dense_g = bench.dense_function(SMALL, "xla-mask", "fwd+bwd")(q, k, v, ct, mask)
    gna_g = bench.gna_function(SMALL, "xla", "fwd+bwd")(q, k, v, ct)
    for a, b, w in zip(dense_g, gna_g, want_g):
        np.testing.assert_allclose(a, w, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(b, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("contestant", ["xla", "xla-mask"])
def test_bwd_call_gives_the_fwd_bwd_gradients(contestant):
    """bwd times vjp_fn(ct) with the residuals as arguments; its gradients are fwd+bwd's."""
    seed = np.random.SeedSequence().entropy % (1 << 31)  # fresh inputs on every run
    q, k, v, ct = bench.make_inputs(SMALL, seed=seed)
    if contestant == "xla":
        forward, extra = bench._gna_forward(SMALL, "xla"), ()
    else:
        forward = bench._dense_forward(SMALL, "xla-mask")
        extra = (jnp.asarray(jax_gna.neighborhood_mask(SMALL.spatial_shape, SMALL.cfg)),)
    args = (q, k, v, ct, *extra)
    fn, fn_args = bench.prepare_call(forward, "bwd", args)
    vjp_fn, ct_arg = fn_args
    leaves = jax.tree_util.tree_leaves(vjp_fn)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    assert ct_arg.shape == ct.shape
    # The residuals are parameters of the timed program, not constants baked into it.
    text = fn.lower(*fn_args).as_text()
    assert "dense<\"0x" not in text
    assert text.count("%arg") >= len(leaves) + 1
    got = fn(*fn_args)
    assert len(got) == 3
    both_fn, both_args = bench.prepare_call(forward, "fwd+bwd", args)
    assert both_args == args
    both = both_fn(*both_args)
    want = _reference_grads(q, k, v, ct, SMALL.cfg)
    for g, b, w in zip(got, both, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, b, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_single_jitted_function_refuses_bwd():
    with pytest.raises(ValueError, match="prepare_call"):
        bench.gna_function(SMALL, "xla", "bwd")
    with pytest.raises(ValueError, match="mode='back'"):
        bench.prepare_call(bench._gna_forward(SMALL, "xla"), "back", ())


def test_time_function_measures_per_call_time():
    def slow(x):
        time.sleep(0.004)
        return x

    t = bench.time_function(slow, (jnp.ones(3),), reps=3, min_time=0.02)
    assert 0.004 <= t["seconds"] < 0.05
    assert t["iters"] >= 3 and t["reps"] == 3


def test_time_function_repeats_calls_too_short_for_max_iters():
    def quick(x):
        time.sleep(0.001)
        return x

    # Five calls (~5 ms) cannot fill min_time: more repetitions, up to max_reps.
    t = bench.time_function(quick, (jnp.ones(3),), reps=3, min_time=0.05, max_iters=5,
                            max_reps=7)
    assert t["iters"] == 5 and t["reps"] == 7
    assert 0.001 <= t["seconds"] < 0.02
    # Calls that fill min_time keep the repetitions asked for.
    t = bench.time_function(quick, (jnp.ones(3),), reps=3, min_time=0.004, max_iters=50)
    assert t["reps"] == 3 and t["iters"] >= 2


def test_progress_bar_counts_steps():
    out = io.StringIO()
    bar = bench.Progress(3, out)
    for label in ("a", "b", "c"):
        bar.step(label)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split("] ")[1] for line in lines] == ["0/3 a", "1/3 b", "2/3 c", "3/3 done"]


def test_run_records_and_json(tmp_path):
    problem = bench.Problem("tiny", (8, 8), GNAConfig(4, 2), heads=2, head_dim=8,
                            dtype="float32")
    records = bench.run([problem], ["xla"], ["xla-mask", "cudnn"], ["fwd", "fwd+bwd", "bwd"],
                        reps=1, min_time=0.0, progress=False)
    assert [(r["contestant"], r["mode"]) for r in records] == [
        ("xla-mask", "fwd"), ("cudnn", "fwd"), ("xla", "fwd"),
        ("xla-mask", "fwd+bwd"), ("cudnn", "fwd+bwd"), ("xla", "fwd+bwd"),
        ("xla-mask", "bwd"), ("cudnn", "bwd"), ("xla", "bwd")]
    sim = jax_gna.simulate((8, 8), GNAConfig(4, 2), head_dim=8)
    for r in records:
        if r["contestant"] == "cudnn" and jax.default_backend() != "gpu":
            assert "skipped" in r and "ms" not in r
            continue
        assert "error" not in r, r
        seconds = r["ms"] / 1e3
        assert r["effective_tflops"] == pytest.approx(
            problem.gna_flops(r["mode"]) / seconds / 1e12)
        if r["mode"] == "bwd":
            assert r["effective_tflops"] == pytest.approx(
                2.5 * problem.gna_flops("fwd") / seconds / 1e12)
        if r["kind"] == "gna":
            dense = next(d for d in records if d["mode"] == r["mode"]
                         and d["contestant"] == "xla-mask")
            assert r["ratio"] == pytest.approx(dense["ms"] / r["ms"])
            assert r["ratio_baseline"] == "xla-mask"
            assert r["ratios"]["xla-mask"] == r["ratio"]
            assert r["flop_bound"] == sim.flop_speedup
            assert r["tile_speedup"] == sim.tile_speedup
        else:
            assert r["tflops"] == pytest.approx(problem.dense_flops(r["mode"]) / seconds / 1e12)
    path = tmp_path / "out.json"
    bench.write_json(str(path), records)
    data = json.loads(path.read_text())
    assert data["results"] == json.loads(json.dumps(records))
    assert data["meta"]["backend"] == jax.default_backend()
    table = bench.format_table(records)
    assert table.count("tiny") == len(records)
    bwd_row = next(line for line in table.splitlines()
                   if line.split()[1:3] == ["bwd", "xla"])
    assert bwd_row.split()[6] == f"{sim.flop_speedup:.1f}x"  # the 'bound' column
    assert bwd_row.endswith("x")  # the ratio column


def test_run_defaults_to_fwd_and_fwd_bwd():
    problem = bench.Problem("tiny", (8, 8), GNAConfig(4, 2), heads=1, head_dim=8,
                            dtype="float32")
    records = bench.run([problem], ["xla"], [], reps=1, min_time=0.0, progress=False)
    assert [r["mode"] for r in records] == ["fwd", "fwd+bwd"]


def test_failing_contestant_is_reported_not_raised():
    def broken(*args):
        raise RuntimeError("kernel exploded")

    rec = {}
    bench._measure(rec, lambda: (broken, ()), 1.0, 1.0, 1, 0.0)
    assert rec == {"error": "RuntimeError: kernel exploded"}
    rec = {}
    bench._measure(rec, broken, 1.0, 1.0, 1, 0.0)  # failing preparation
    assert rec == {"error": "RuntimeError: kernel exploded"}


def test_failing_bwd_preparation_is_an_error_record(monkeypatch):
    """A forward that fails in bwd's untimed preparation is reported; the others still run."""
    problem = bench.Problem("tiny", (8, 8), GNAConfig(4, 2), heads=1, head_dim=8,
                            dtype="float32")
    gna_forward = bench._gna_forward

    def forward(problem, implementation):
        if implementation == "reference":
            def f(q, k, v):
                raise RuntimeError("forward exploded")
            return f
        return gna_forward(problem, implementation)

    monkeypatch.setattr(bench, "_gna_forward", forward)
    records = bench.run([problem], ["reference", "xla"], ["xla-mask"], ["bwd"], reps=1,
                        min_time=0.0, progress=False)
    rows = {r["contestant"]: r for r in records}
    assert list(rows) == ["xla-mask", "reference", "xla"]
    assert rows["reference"]["error"] == "RuntimeError: forward exploded"
    assert "ms" not in rows["reference"]
    for name in ("xla-mask", "xla"):
        assert "error" not in rows[name] and rows[name]["ms"] > 0
    assert rows["xla"]["ratio"] == pytest.approx(rows["xla-mask"]["ms"] / rows["xla"]["ms"])
    assert "ERROR: RuntimeError: forward exploded" in bench.format_table(records)


def test_masked_baseline_refuses_huge_problems():
    assert "materialise" in bench.baseline_unavailable(bench.get_problem("flux-4k-na"),
                                                       "xla-mask")
    assert bench.baseline_unavailable(bench.get_problem("xla-16k-na"), "xla-mask") is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(baselines=["flash"]), "baseline='flash'"),
    (dict(modes=["back"]), "mode='back'"),
    (dict(implementations=["nope"]), "implementation='nope'"),
])
def test_run_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.run([SMALL], **{"progress": False, **kwargs})
