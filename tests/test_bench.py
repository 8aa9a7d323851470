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


def test_time_function_measures_per_call_time():
    def slow(x):
        time.sleep(0.004)
        return x

    t = bench.time_function(slow, (jnp.ones(3),), reps=3, min_time=0.02)
    assert 0.004 <= t["seconds"] < 0.05
    assert t["iters"] >= 3 and t["reps"] == 3


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
    records = bench.run([problem], ["xla"], ["xla-mask", "cudnn"], ["fwd", "fwd+bwd"],
                        reps=1, min_time=0.0, progress=False)
    assert [(r["contestant"], r["mode"]) for r in records] == [
        ("xla-mask", "fwd"), ("cudnn", "fwd"), ("xla", "fwd"),
        ("xla-mask", "fwd+bwd"), ("cudnn", "fwd+bwd"), ("xla", "fwd+bwd")]
    sim = jax_gna.simulate((8, 8), GNAConfig(4, 2), head_dim=8)
    for r in records:
        if r["contestant"] == "cudnn" and jax.default_backend() != "gpu":
            assert "skipped" in r and "ms" not in r
            continue
        assert "error" not in r, r
        seconds = r["ms"] / 1e3
        assert r["effective_tflops"] == pytest.approx(
            problem.gna_flops(r["mode"]) / seconds / 1e12)
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


def test_failing_contestant_is_reported_not_raised():
    def broken(*args):
        raise RuntimeError("kernel exploded")

    rec = {}
    bench._measure(rec, broken, (), 1.0, 1.0, 1, 0.0)
    assert rec == {"error": "RuntimeError: kernel exploded"}


def test_masked_baseline_refuses_huge_problems():
    assert "materialise" in bench.baseline_unavailable(bench.get_problem("flux-4k-na"),
                                                       "xla-mask")
    assert bench.baseline_unavailable(bench.get_problem("xla-16k-na"), "xla-mask") is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(baselines=["flash"]), "baseline='flash'"),
    (dict(modes=["bwd"]), "mode='bwd'"),
    (dict(implementations=["nope"]), "implementation='nope'"),
])
def test_run_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.run([SMALL], **{"progress": False, **kwargs})
