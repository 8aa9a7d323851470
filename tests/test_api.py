"""Public API: bad input is refused before anything runs, with messages naming the rule."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_gna
from jax_gna import api


def _qkv(spatial=(8, 8), heads=4, kv_heads=2, d=8, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((1, *spatial, h, d)), dtype)
            for h in (heads, kv_heads, kv_heads)]


def _abstract(spatial=(8, 8), heads=4, kv_heads=2, d=8, dtype=jnp.float32):
    """ShapeDtypeStructs: `jax.eval_shape` on them proves the error comes before any compute."""
    return [jax.ShapeDtypeStruct((1, *spatial, h, d), dtype) for h in (heads, kv_heads, kv_heads)]


def _raises_everywhere(exc, match, args, cfg, **kwargs):
    """The error is raised eagerly, under jit (at trace time) and with abstract inputs."""
    call = lambda q, k, v: jax_gna.attention(q, k, v, cfg, **kwargs)  # noqa: E731
    concrete = [jnp.zeros(a.shape, a.dtype) for a in args]
    with pytest.raises(exc, match=match):
        call(*concrete)
    with pytest.raises(exc, match=match):
        jax.jit(call)(*concrete)
    with pytest.raises(exc, match=match):
        jax.eval_shape(call, *args)


@pytest.mark.parametrize("cfg,spatial,match", [
    (jax_gna.GNAConfig((4, 4), stride=(1, 5)), (8, 8),
     r"stride\[1\]=5 must be <= kernel_size\[1\]=4"),
    (jax_gna.GNAConfig(1), (8, 8), r"kernel_size\[0\]=1 must be >= 2"),
    (jax_gna.GNAConfig((3, 5), dilation=(1, 2)), (8, 8),
     r"kernel_size\[1\]\*dilation\[1\]=5\*2=10 must be <= the axis length 8"),
    (jax_gna.GNAConfig(9), (8, 8), r"kernel_size\[0\]\*dilation\[0\]=9\*1=9 must be <= the axis"),
    (jax_gna.GNAConfig((3, 3, 3)), (8, 8), r"GNAConfig has 3 axes but the input has 2 spatial"),
    (jax_gna.GNAConfig((3,)), (8, 8), r"GNAConfig has 1 axes but the input has 2 spatial"),
    (jax_gna.GNAConfig(3, stride=0), (8,), r"stride\[0\]=0 must be >= 1"),
    (jax_gna.GNAConfig(3, dilation=0), (8,), r"dilation\[0\]=0 must be >= 1"),
    (jax_gna.GNAConfig(-1, dilation=2), (8,), r"kernel_size\[0\]=-1 \(whole axis\) requires"),
])
def test_bad_config(cfg, spatial, match):
    _raises_everywhere(ValueError, match, _abstract(spatial), cfg)


@pytest.mark.parametrize("shapes,match", [
    (((1, 8, 8, 4, 8), (1, 8, 7, 2, 8), (1, 8, 7, 2, 8)),
     r"k's batch and spatial shape \(1, 8, 7\) must equal q's \(1, 8, 8\)"),
    (((1, 8, 8, 4, 8), (1, 8, 8, 2, 8), (2, 8, 8, 2, 8)), r"v's batch and spatial shape"),
    (((1, 8, 8, 4, 8), (1, 8, 8, 2, 16), (1, 8, 8, 2, 16)),
     r"k's head_dim 16 must equal q's 8"),
    (((1, 8, 8, 4, 8), (1, 8, 8, 2, 8), (1, 8, 8, 2, 4)), r"v's head_dim 4 must equal q's 8"),
    (((1, 8, 8, 4, 8), (1, 8, 8, 3, 8), (1, 8, 8, 3, 8)),
     r"q's heads H=4 must be a multiple of k/v's heads H_kv=3"),
    (((1, 8, 8, 4, 8), (1, 8, 8, 2, 8), (1, 8, 8, 1, 8)), r"k and v must have the same number"),
    (((1, 8, 8, 4, 8), (1, 8, 8, 8), (1, 8, 8, 8)), r"k has shape .* but q has shape"),
    (((8, 4, 8), (8, 4, 8), (8, 4, 8)), r"q must be \[B, \*spatial, H, D\]"),
])
def test_bad_shapes(shapes, match):
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    _raises_everywhere(ValueError, match, args, jax_gna.GNAConfig(3))


@pytest.mark.parametrize("dtypes,match", [
    ((jnp.int32,) * 3, r"q has dtype int32; GNA needs floating-point inputs"),
    ((jnp.float32, jnp.int8, jnp.float32), r"k has dtype int8; GNA needs floating-point"),
    ((jnp.float32, jnp.float32, jnp.bool_), r"v has dtype bool; GNA needs floating-point"),
    ((jnp.float32, jnp.bfloat16, jnp.float32), r"q, k and v must share one dtype"),
    ((jnp.float16, jnp.float16, jnp.bfloat16), r"q, k and v must share one dtype"),
])
def test_bad_dtypes(dtypes, match):
    args = [jax.ShapeDtypeStruct((1, 8, 8, h, 8), dt) for h, dt in zip((4, 2, 2), dtypes)]
    _raises_everywhere(TypeError, match, args, jax_gna.GNAConfig(3))


def test_bad_arguments():
    args = _abstract()
    cfg = jax_gna.GNAConfig(3)
    _raises_everywhere(ValueError, r"implementation='nope' is unknown; choose one of", args,
                       cfg, implementation="nope")
    _raises_everywhere(TypeError, r"scale must be a Python float", args, cfg, scale="0.5")
    _raises_everywhere(ValueError, r"q_tile_shape=\(4,\) must be 2 positive ints", args, cfg,
                       q_tile_shape=(4,))
    _raises_everywhere(ValueError, r"kv_tile_shape=\(4, 0\) must be 2 positive ints", args,
                       cfg, kv_tile_shape=(4, 0))
    with pytest.raises(TypeError, match=r"cfg must be a jax_gna.GNAConfig, got tuple"):
        jax_gna.attention(*_qkv(), (3, 3))
    with pytest.raises(TypeError, match=r"q must be an array, got list"):
        jax_gna.attention([[1.0]], *_qkv()[1:], cfg)


def test_reference_refuses_large_inputs_and_points_to_xla():
    args = _abstract(spatial=(129, 129), heads=1, kv_heads=1, d=2)
    msg = r"implementation='reference' would build .* use implementation='xla'"
    _raises_everywhere(ValueError, msg, args, jax_gna.GNAConfig(3), implementation="reference")
    # The same layout is fine for xla (abstractly: nothing is computed).
    out = jax.eval_shape(lambda q, k, v: jax_gna.attention(q, k, v, jax_gna.GNAConfig(3),
                                                           implementation="xla"), *args)
    assert out.shape == args[0].shape


@pytest.fixture
def fake_implementations(monkeypatch):
    """Two registered implementations: one unavailable here, one bf16-only."""
    registry = dict(api._REGISTRY)

    def never_runs(*_args, **_kwargs):
        raise AssertionError("the implementation must not be called")

    registry["fake_gpu"] = api.Implementation("fake_gpu", never_runs,
                                              lambda: "no fake GPU on this machine", 99)
    registry["fake_bf16"] = api.Implementation("fake_bf16", never_runs, lambda: None, -1,
                                               dtypes=("bfloat16",))
    monkeypatch.setattr(api, "_REGISTRY", registry)


def test_unavailable_or_wrong_dtype_implementation(fake_implementations):
    args, cfg = _abstract(), jax_gna.GNAConfig(3)
    _raises_everywhere(ValueError, r"implementation='fake_gpu' is not available here: no fake "
                       r"GPU on this machine", args, cfg, implementation="fake_gpu")
    _raises_everywhere(TypeError, r"implementation='fake_bf16' does not accept dtype float32",
                       args, cfg, implementation="fake_bf16")
    assert "fake_gpu" not in jax_gna.available_implementations()


def test_available_implementations_and_default_pick():
    names = jax_gna.available_implementations()
    assert {"xla", "reference"} <= set(names)
    assert names.index("xla") < names.index("reference")
    q, k, v = _qkv()
    cfg = jax_gna.GNAConfig((3, 5), stride=(1, 2))
    default = jax_gna.attention(q, k, v, cfg)
    best = next(n for n in names if n != "reference")
    np.testing.assert_array_equal(default, jax_gna.attention(q, k, v, cfg, implementation=best))
    ref = jax_gna.attention(q, k, v, cfg, implementation="reference")
    np.testing.assert_allclose(default, ref, atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# na1d / na2d / na3d.
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("na,rank", [(jax_gna.na1d, 1), (jax_gna.na2d, 2), (jax_gna.na3d, 3)])
def test_na_rank_checks(na, rank):
    for wrong in {1, 2, 3} - {rank}:
        q, k, v = _qkv(spatial=(6,) * wrong, heads=2, kv_heads=2)
        with pytest.raises(ValueError, match=rf"na{rank}d expects q of rank {rank + 3}"):
            na(q, k, v, 3)
    q, k, v = _qkv(spatial=(6,) * rank, heads=2, kv_heads=2)
    bad_kernel = (3,) * (rank % 3 + 1)
    with pytest.raises(ValueError, match=rf"na{rank}d got per-axis parameters for "
                                         rf"{len(bad_kernel)} axes"):
        na(q, k, v, bad_kernel)
    out = na(q, k, v, 3, is_causal=True)
    expected = jax_gna.attention(q, k, v, jax_gna.GNAConfig(3, is_causal=True))
    np.testing.assert_array_equal(out, expected)


def test_return_lse_shapes():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    out, lse = jax_gna.attention(q, k, v, jax_gna.GNAConfig(3), return_lse=True)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    assert lse.shape == q.shape[:-1] and lse.dtype == jnp.float32


# ----------------------------------------------------------------------------------------
# GNAConfig.
# ----------------------------------------------------------------------------------------

def test_config_is_hashable_and_normalised():
    a = jax_gna.GNAConfig([3, 5], stride=[1, 2], is_causal=[True, False])
    b = jax_gna.GNAConfig((3, 5), stride=(1, 2), is_causal=(True, False))
    assert a == b and hash(a) == hash(b)
    assert a.kernel_size == (3, 5) and isinstance(a.stride, tuple)
    assert len({a, b, jax_gna.GNAConfig((3, 5))}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.kernel_size = 7


def test_config_as_jit_static_argument():
    traces = []

    @functools.partial(jax.jit, static_argnames="cfg")
    def run(q, k, v, cfg):
        traces.append(cfg)
        return jax_gna.attention(q, k, v, cfg)
    q, k, v = _qkv()
    first = run(q, k, v, cfg=jax_gna.GNAConfig([3, 3]))
    second = run(q, k, v, cfg=jax_gna.GNAConfig((3, 3)))        # equal config: no retrace
    third = run(q, k, v, cfg=jax_gna.GNAConfig((3, 3), stride=3))
    assert len(traces) == 2
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, third)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(kernel_size=3.0), TypeError, r"kernel_size\[0\]=3.0 must be an int"),
    (dict(kernel_size=True), TypeError, r"kernel_size\[0\]=True must be an int"),
    (dict(kernel_size=(3, 3), stride=(1, 1, 1)), ValueError, r"must have the same number of"),
    (dict(kernel_size=3, is_causal=2), TypeError, r"is_causal\[0\]=2 must be a bool"),
    (dict(kernel_size=(3, 3, 3, 3)), ValueError, r"at most 3 spatial axes"),
    (dict(kernel_size=()), ValueError, r"kernel_size must not be empty"),
])
def test_config_construction_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        jax_gna.GNAConfig(**kwargs)


def test_neighborhood_mask_validates():
    with pytest.raises(ValueError, match=re.escape("stride[0]=4 must be <= kernel_size[0]=3")):
        jax_gna.neighborhood_mask((8,), jax_gna.GNAConfig(3, stride=4))
