"""Flax NNX / Linen layers and the attention_fn adapter against dense masked float64 math."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jax_gna
import jax_gna.flax as gflax
from jax_gna.flax import linen as glinen


def _implementations():
    return [n for n in ("reference", "xla", "cpu")
            if n == "reference" or n in jax_gna.available_implementations()]


def np_masked_attention(q, k, v, mask, scale):
    """``q [B,N,H,D]``, ``k, v [B,M,Hkv,D]``, boolean ``mask [N,M]`` -> ``[B,N,H,D]``."""
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.where(mask, np.einsum("bnhd,bmhd->bhnm", q, k) * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhnm,bmhd->bnhd", p, v)


def np_layer(x, params, heads, kv_heads, cfg, context=None):
    """The NeighborhoodAttention layer written out densely in float64 numpy."""
    x = np.asarray(x, np.float64)
    b, *spatial, c = x.shape
    n, d = math.prod(spatial), c // heads
    wq, bq = np.asarray(params["qkv"]["kernel"], np.float64), params["qkv"].get("bias")
    bq = 0.0 if bq is None else np.asarray(bq, np.float64)

    def split(t, length):
        qkv = t.reshape(b, length, c) @ wq + bq
        return (qkv[..., :heads * d].reshape(b, length, heads, d),
                qkv[..., heads * d:(heads + kv_heads) * d].reshape(b, length, kv_heads, d),
                qkv[..., (heads + kv_heads) * d:].reshape(b, length, kv_heads, d))

    q, k, v = split(x, n)
    mask = jax_gna.neighborhood_mask(tuple(spatial), cfg)
    if context is not None:
        s = context.shape[1]
        _, ck, cv = split(np.asarray(context, np.float64), s)
        k, v = np.concatenate([k, ck], 1), np.concatenate([v, cv], 1)
        mask = np.concatenate([mask, np.ones((n, s), bool)], axis=1)
    out = np_masked_attention(q, k, v, mask, d ** -0.5).reshape(b, n, heads * d)
    out = out @ np.asarray(params["proj"]["kernel"], np.float64) + np.asarray(
        params["proj"]["bias"], np.float64)
    return out.reshape(b, *spatial, -1)


def nnx_params(module) -> dict:
    state = nnx.state(module, nnx.Param)
    return jax.tree.map(lambda p: p, nnx.to_pure_dict(state))


def make_layer(rank, implementation="reference", **kw):
    spatial = {1: (9,), 2: (5, 6), 3: (3, 4, 5)}[rank]
    kernel = {1: 4, 2: (3, 4), 3: (2, 3, 3)}[rank]
    kw.setdefault("stride", {1: 2, 2: (1, 2), 3: (1, 2, 1)}[rank])
    layer = gflax.NeighborhoodAttention(
        16, 4, kernel, implementation=implementation,
        bias_init=nnx.initializers.normal(0.5), rngs=nnx.Rngs(rank), **kw)
    return layer, spatial


# ----------------------------------------------------------------------------------------
# NNX layer
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, count", [
    ({}, 16 * 48 + 48 + 16 * 16 + 16),
    ({"num_kv_heads": 2}, 16 * 32 + 32 + 16 * 16 + 16),
    ({"qkv_bias": False, "out_features": 8}, 16 * 48 + 16 * 8 + 8),
])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_nnx_shapes_and_parameter_counts(rank, kw, count):
    layer, spatial = make_layer(rank, **kw)
    leaves = jax.tree.leaves(nnx.state(layer, nnx.Param))
    assert sum(x.size for x in leaves) == count
    x = jax.random.normal(jax.random.key(0), (2, *spatial, 16))
    y = layer(x)
    assert y.shape == (2, *spatial, kw.get("out_features", 16))
    assert y.dtype == jnp.float32


@pytest.mark.parametrize("implementation", _implementations())
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("with_context", [False, True])
def test_nnx_equals_dense_masked_layer(rank, implementation, with_context):
    layer, spatial = make_layer(rank, implementation, num_kv_heads=2, dilation=1)
    rng = np.random.default_rng(rank)
    x = jnp.asarray(rng.standard_normal((2, *spatial, 16)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32) if with_context else None
    got = nnx.jit(lambda m, x, c: m(x, c))(layer, x, ctx)
    want = np_layer(x, nnx_params(layer), 4, 2, layer.cfg, ctx)
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5)


def test_nnx_dilated_causal_layer_equals_dense():
    layer = gflax.NeighborhoodAttention(8, 2, (2, 3), dilation=(2, 1), is_causal=(True, False),
                                        bias_init=nnx.initializers.normal(0.5),
                                        implementation="reference", rngs=nnx.Rngs(3))
    x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 6, 5, 8)), jnp.float32)
    np.testing.assert_allclose(layer(x), np_layer(x, nnx_params(layer), 2, 2, layer.cfg),
                               atol=5e-5, rtol=5e-5)


def _jnp_dense_layer(params, x, heads, cfg):
    """Differentiable float32 jnp twin of `np_layer` (no context, MHA)."""
    b, *spatial, c = x.shape
    n, d = math.prod(spatial), c // heads
    qkv = x.reshape(b, n, c) @ params["qkv"]["kernel"] + params["qkv"]["bias"]
    q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, n, heads, d) for i in range(3))
    s = jnp.einsum("bnhd,bmhd->bhnm", q, k) * d ** -0.5
    s = jnp.where(jax_gna.neighborhood_mask(tuple(spatial), cfg), s, -jnp.inf)
    out = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, -1), v).reshape(b, n, c)
    return (out @ params["proj"]["kernel"] + params["proj"]["bias"]).reshape(x.shape)


@pytest.mark.parametrize("implementation", _implementations())
def test_nnx_grad_matches_dense_masked_grad(implementation):
    layer, spatial = make_layer(2, implementation)
    x = jax.random.normal(jax.random.key(5), (2, *spatial, 16))
    w = jax.random.normal(jax.random.key(6), (2, *spatial, 16))

    @nnx.jit
    def loss_and_grad(m, x):
        return nnx.value_and_grad(lambda m: jnp.sum(m(x) * w))(m)

    loss, grads = loss_and_grad(layer, x)
    params = nnx_params(layer)
    want_loss, want = jax.value_and_grad(
        lambda p: jnp.sum(_jnp_dense_layer(p, x, 4, layer.cfg) * w))(params)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-4)
    got = nnx.to_pure_dict(grads)
    for path in (("qkv", "kernel"), ("qkv", "bias"), ("proj", "kernel"), ("proj", "bias")):
        np.testing.assert_allclose(got[path[0]][path[1]], want[path[0]][path[1]],
                                   atol=2e-4, rtol=2e-4, err_msg=str(path))


def test_nnx_split_merge_roundtrip_and_functional_jit():
    layer, spatial = make_layer(3)
    x = jax.random.normal(jax.random.key(7), (1, *spatial, 16))
    graphdef, state = nnx.split(layer)
    clone = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(clone(x), layer(x))

    @jax.jit
    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    np.testing.assert_allclose(apply(state, x), layer(x), atol=1e-6)


def test_nnx_bfloat16_compute_dtype():
    layer = gflax.NeighborhoodAttention(16, 2, 3, dtype=jnp.bfloat16,
                                        implementation="reference", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(8), (1, 7, 16))
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    want = np_layer(x, nnx_params(layer), 2, 2, layer.cfg)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("args, kw, match", [
    ((15, 4, 3), {}, "in_features=15 must be divisible by num_heads=4"),
    ((16, 4, 3), {"num_kv_heads": 3}, "num_kv_heads=3"),
    ((16, 0, 3), {}, "num_heads=0"),
    ((16, 4, 3), {"stride": 4}, r"stride\[0\]=4 must be <= kernel_size\[0\]=3"),
])
def test_nnx_rejects_bad_layer_arguments(args, kw, match):
    with pytest.raises(ValueError, match=match):
        layer = gflax.NeighborhoodAttention(*args, rngs=nnx.Rngs(0),
                                            implementation="reference", **kw)
        layer(jnp.ones((1, 8, args[0])))


@pytest.mark.parametrize("shape, ctx_shape, match", [
    ((1, 8, 12), None, "in_features=16"),
    ((8, 16), None, "1 to 3 spatial axes"),
    ((1, 8, 16), (2, 3, 16), "context must be"),
])
def test_nnx_rejects_bad_inputs(shape, ctx_shape, match):
    layer = gflax.NeighborhoodAttention(16, 4, 3, implementation="reference",
                                        rngs=nnx.Rngs(0))
    ctx = None if ctx_shape is None else jnp.ones(ctx_shape)
    with pytest.raises(ValueError, match=match):
        layer(jnp.ones(shape), ctx)


# ----------------------------------------------------------------------------------------
# Linen twin
# ----------------------------------------------------------------------------------------

def test_linen_equals_nnx_with_the_same_parameters_and_dense():
    layer, spatial = make_layer(2, num_kv_heads=2)
    twin = glinen.NeighborhoodAttention(num_heads=4, kernel_size=(3, 4), stride=(1, 2),
                                        num_kv_heads=2, implementation="reference")
    x = jax.random.normal(jax.random.key(9), (2, *spatial, 16))
    ctx = jax.random.normal(jax.random.key(10), (2, 5, 16))
    variables = twin.init(jax.random.key(0), x, ctx)
    shapes = jax.tree.map(jnp.shape, variables["params"])
    assert shapes == jax.tree.map(jnp.shape, nnx_params(layer))
    params = {"params": nnx_params(layer)}
    got = jax.jit(twin.apply)(params, x, ctx)
    np.testing.assert_allclose(got, layer(x, ctx), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got, np_layer(x, params["params"], 4, 2, layer.cfg, ctx),
                               atol=5e-5, rtol=5e-5)


def test_linen_parameter_count_jit_and_grad():
    twin = glinen.NeighborhoodAttention(num_heads=4, kernel_size=(3, 4), stride=(1, 2),
                                        out_features=12, implementation="reference")
    x = jax.random.normal(jax.random.key(11), (2, 5, 6, 16))
    params = twin.init(jax.random.key(1), x)["params"]
    assert sum(p.size for p in jax.tree.leaves(params)) == 16 * 48 + 48 + 16 * 12 + 12
    assert twin.apply({"params": params}, x).shape == (2, 5, 6, 12)
    w = jax.random.normal(jax.random.key(12), (2, 5, 6, 12))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(twin.apply({"params": p}, x) * w)))(params)
    # Finite difference along a random direction (float32; loose but meaningful).
    direction = jax.tree.map(lambda p: jax.random.normal(jax.random.key(13), p.shape), params)
    eps = 1e-2

    def loss(p):
        return jnp.sum(twin.apply({"params": p}, x) * w)

    plus = loss(jax.tree.map(lambda p, d: p + eps * d, params, direction))
    minus = loss(jax.tree.map(lambda p, d: p - eps * d, params, direction))
    fd = (plus - minus) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in
                   zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, fd, rtol=2e-2)


def test_linen_rejects_wrong_in_features():
    twin = glinen.NeighborhoodAttention(num_heads=2, kernel_size=3, in_features=8,
                                        implementation="reference")
    with pytest.raises(ValueError, match="in_features=8"):
        twin.init(jax.random.key(0), jnp.ones((1, 6, 4)))


# ----------------------------------------------------------------------------------------
# attention_fn adapter
# ----------------------------------------------------------------------------------------

def np_mha(x, p, heads, kv_heads, cfg, spatial):
    """nnx.MultiHeadAttention / Linen MHDPA on a token layout, densely masked in float64."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x = f(x).reshape(x.shape[0], -1, x.shape[-1])
    q = np.einsum("bnc,chd->bnhd", x, f(p["query"]["kernel"])) + f(p["query"]["bias"])
    k = np.einsum("bnc,chd->bnhd", x, f(p["key"]["kernel"])) + f(p["key"]["bias"])
    v = np.einsum("bnc,chd->bnhd", x, f(p["value"]["kernel"])) + f(p["value"]["bias"])
    mask = jax_gna.neighborhood_mask(spatial, cfg)
    out = np_masked_attention(q, k, v, mask, q.shape[-1] ** -0.5)
    return np.einsum("bnhd,hdc->bnc", out, f(p["out"]["kernel"])) + f(p["out"]["bias"])


@pytest.mark.parametrize("implementation", _implementations())
@pytest.mark.parametrize("kv_heads, layout", [(4, "tokens"), (2, "tokens"), (4, "grid")])
def test_attention_fn_inside_nnx_multihead_attention(implementation, kv_heads, layout):
    spatial, cfg = (5, 6), jax_gna.GNAConfig((3, 4), stride=(1, 2))
    mha = nnx.MultiHeadAttention(
        num_heads=4, in_features=16, num_kv_heads=kv_heads, decode=False,
        bias_init=nnx.initializers.normal(0.5),
        attention_fn=gflax.gna_attention_fn(spatial, cfg, implementation), rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(14), (2, 30, 16))
    inp = x if layout == "tokens" else x.reshape(2, *spatial, 16)
    y = nnx.jit(lambda m, x: m(x))(mha, inp)
    assert y.shape == inp.shape
    want = np_mha(x, nnx_params(mha), 4, kv_heads, cfg, spatial)
    np.testing.assert_allclose(np.asarray(y).reshape(2, 30, 16), want, atol=5e-5, rtol=5e-5)


def test_attention_fn_inside_linen_multihead_attention():
    spatial, cfg = (9,), jax_gna.GNAConfig(4, is_causal=True)
    mha = nn.MultiHeadDotProductAttention(
        num_heads=2, bias_init=nn.initializers.normal(0.5),
        attention_fn=gflax.gna_attention_fn(spatial, cfg, "reference"))
    x = jax.random.normal(jax.random.key(15), (3, 9, 8))
    params = mha.init(jax.random.key(0), x)
    y = mha.apply(params, x)
    np.testing.assert_allclose(y, np_mha(x, params["params"], 2, 2, cfg, spatial),
                               atol=5e-5, rtol=5e-5)


def _mha(**kw):
    return nnx.MultiHeadAttention(
        num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0),
        attention_fn=gflax.gna_attention_fn((6,), jax_gna.GNAConfig(3), "reference"), **kw)


@pytest.mark.parametrize("make, call, match", [
    (lambda: _mha(), dict(mask=jnp.ones((1, 2, 6, 6), bool)), "mask is not supported"),
    (lambda: _mha(dropout_rate=0.1), dict(deterministic=False), "dropout_rate=0.1"),
    (lambda: _mha(), dict(sow_weights=True), "sow_weights"),
    (lambda: _mha(), dict(is_causal=True), "is_causal=True"),
    (lambda: _mha(precision=jax.lax.Precision.HIGHEST), {}, "precision"),
])
def test_attention_fn_rejects_what_it_cannot_honour(make, call, match):
    with pytest.raises(ValueError, match=match):
        make()(jnp.ones((1, 6, 8)), **call)


def test_attention_fn_allows_deterministic_dropout_and_causal_config():
    mha = _mha(dropout_rate=0.1)
    x = jax.random.normal(jax.random.key(16), (1, 6, 8))
    np.testing.assert_allclose(mha(x, deterministic=True),
                               np_mha(x, nnx_params(mha), 2, 2, jax_gna.GNAConfig(3), (6,)),
                               atol=5e-5, rtol=5e-5)
    causal = gflax.gna_attention_fn((6,), jax_gna.GNAConfig(3, is_causal=True), "reference")
    q = jax.random.normal(jax.random.key(17), (1, 6, 2, 4))
    np.testing.assert_allclose(
        causal(q, q, q, is_causal=True),
        jax_gna.attention(q, q, q, jax_gna.GNAConfig(3, is_causal=True),
                          implementation="reference"), atol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda f, q: f(q, q, q, bias=jnp.zeros((1, 2, 6, 6))), "bias is not supported"),
    (lambda f, q: f(q, q[:, :5], q[:, :5]), "key of shape"),
    (lambda f, q: f(q, q[:1].repeat(2, 0), q), "key has shape"),
    (lambda f, q: f(q[:, :5], q[:, :5], q[:, :5]), "query of shape .* neither N=6"),
    (lambda f, q: f(q, q, q, qk_attn_weights_einsum=jnp.einsum), "einsum"),
])
def test_attention_fn_rejects_bad_direct_calls(call, match):
    fn = gflax.gna_attention_fn((6,), jax_gna.GNAConfig(3), "reference")
    with pytest.raises(ValueError, match=match):
        call(fn, jnp.ones((1, 6, 2, 4)))


def test_attention_fn_validates_config_early():
    with pytest.raises(ValueError, match="must be <= the axis length"):
        gflax.gna_attention_fn((4, 4), jax_gna.GNAConfig((3, 5)))
    with pytest.raises(TypeError, match="GNAConfig"):
        gflax.gna_attention_fn((4,), 3)
