"""LSE merging and additional tokens against float64 numpy dense attention over the union."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_gna
from jax_gna import merge


# ----------------------------------------------------------------------------------------
# float64 numpy reference: dense masked attention and its hand-derived VJP.
# ----------------------------------------------------------------------------------------

def np_attention(q, k, v, mask, scale):
    """``q [B,N,H,D]``, ``k, v [B,M,Hkv,D]``, ``mask [N,M]`` -> out, lse (float64)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    kh, vh = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bnhd,bmhd->bhnm", q, kh) * scale
    s = np.where(mask, s, -np.inf)
    top = s.max(-1, keepdims=True)
    p = np.exp(s - top)
    lse = np.log(p.sum(-1)) + top[..., 0]
    p = p / p.sum(-1, keepdims=True)
    out = np.einsum("bhnm,bmhd->bnhd", p, vh)
    return out, np.transpose(lse, (0, 2, 1))


def np_attention_vjp(q, k, v, mask, scale, d_out, d_lse):
    """Gradients of ``<out, d_out> + <lse, d_lse>`` wrt q, k, v (float64)."""
    q, k, v, d_out, d_lse = (np.asarray(x, np.float64) for x in (q, k, v, d_out, d_lse))
    b, m, h_kv, d = k.shape
    g = q.shape[2] // h_kv
    kh, vh = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.where(mask, np.einsum("bnhd,bmhd->bhnm", q, kh) * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    dp = np.einsum("bnhd,bmhd->bhnm", d_out, vh)
    delta = (p * dp).sum(-1, keepdims=True)
    ds = p * (dp - delta + np.transpose(d_lse, (0, 2, 1))[..., None]) * scale
    dq = np.einsum("bhnm,bmhd->bnhd", ds, kh)
    dkh = np.einsum("bhnm,bnhd->bmhd", ds, q)
    dvh = np.einsum("bhnm,bnhd->bmhd", p, d_out)
    dk = dkh.reshape(b, m, h_kv, g, d).sum(3)
    dv = dvh.reshape(b, m, h_kv, g, d).sum(3)
    return dq, dk, dv


def union_inputs(spatial, cfg, heads, kv_heads, d, extra, seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    b = 2
    q = rng.standard_normal((b, *spatial, heads, d))
    k = rng.standard_normal((b, *spatial, kv_heads, d))
    v = rng.standard_normal((b, *spatial, kv_heads, d))
    ak = rng.standard_normal((b, extra, kv_heads, d))
    av = rng.standard_normal((b, extra, kv_heads, d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v, ak, av))


def union_reference(q, k, v, ak, av, cfg, scale, d_out=None, d_lse=None):
    """Forward (and optionally VJP) of dense attention over neighbourhood ∪ extra tokens."""
    b, *spatial, h, d = q.shape
    n = int(np.prod(spatial))
    nb = jax_gna.neighborhood_mask(tuple(spatial), cfg)
    mask = np.concatenate([nb, np.ones((n, ak.shape[1]), bool)], axis=1)
    qf = np.asarray(q, np.float64).reshape(b, n, h, d)
    kf = np.concatenate([np.asarray(k, np.float64).reshape(b, n, -1, d),
                         np.asarray(ak, np.float64)], axis=1)
    vf = np.concatenate([np.asarray(v, np.float64).reshape(b, n, -1, d),
                         np.asarray(av, np.float64)], axis=1)
    out, lse = np_attention(qf, kf, vf, mask, scale)
    fwd = out.reshape(q.shape), lse.reshape(q.shape[:-1])
    if d_out is None:
        return fwd
    dq, dk, dv = np_attention_vjp(qf, kf, vf, mask, scale,
                                  np.asarray(d_out).reshape(b, n, h, d),
                                  np.asarray(d_lse).reshape(b, n, h))
    return fwd, (dq.reshape(q.shape), dk[:, :n].reshape(k.shape), dv[:, :n].reshape(v.shape),
                 dk[:, n:], dv[:, n:])


def _implementations():
    return [n for n in ("reference", "xla", "cpu")
            if n == "reference" or n in jax_gna.available_implementations()]


CASES = [
    # spatial, cfg, heads, kv_heads, head_dim, extra tokens
    ((11,), jax_gna.GNAConfig(4, stride=2), 2, 2, 8, 5),
    ((6, 7), jax_gna.GNAConfig((3, 4), stride=(1, 2)), 4, 2, 8, 3),
    ((4, 5, 6), jax_gna.GNAConfig((2, 3, 3), stride=(1, 3, 2), dilation=(2, 1, 2),
                                  is_causal=(True, False, False)), 2, 1, 4, 4),
]


@pytest.mark.parametrize("implementation", _implementations())
@pytest.mark.parametrize("case", range(len(CASES)))
def test_additional_tokens_forward_and_grads_match_dense_union(implementation, case):
    spatial, cfg, heads, kv_heads, d, extra = CASES[case]
    q, k, v, ak, av = union_inputs(spatial, cfg, heads, kv_heads, d, extra, seed=case)
    scale = 0.7 * d ** -0.5

    def f(q, k, v, ak, av):
        return jax_gna.attention(q, k, v, cfg, scale=scale, implementation=implementation,
                                 return_lse=True, additional_keys=ak,
                                 additional_values=av)

    (out, lse), vjp = jax.vjp(jax.jit(f), q, k, v, ak, av)
    rng = np.random.default_rng(100 + case)
    d_out = rng.standard_normal(out.shape).astype(np.float32)
    d_lse = rng.standard_normal(lse.shape).astype(np.float32)
    grads = vjp((jnp.asarray(d_out), jnp.asarray(d_lse)))
    (ref_out, ref_lse), ref_grads = union_reference(q, k, v, ak, av, cfg, scale, d_out, d_lse)

    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=2e-5)
    for name, got, want in zip(("q", "k", "v", "additional_keys", "additional_values"),
                               grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)


def test_additional_tokens_bfloat16_forward():
    spatial, cfg, heads, kv_heads, d, extra = CASES[1]
    q, k, v, ak, av = union_inputs(spatial, cfg, heads, kv_heads, d, extra, seed=7,
                                   dtype=jnp.bfloat16)
    out = jax_gna.attention(q, k, v, cfg, implementation="reference", additional_keys=ak,
                            additional_values=av)
    ref_out, _ = union_reference(q, k, v, ak, av, cfg, d ** -0.5)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=2e-2, rtol=2e-2)


def test_dense_attention_with_lse_matches_numpy_including_lse_cotangent():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((2, 9, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 5, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 5, 2, 8)), jnp.float32)
    (out, lse), vjp = jax.vjp(lambda q, k, v: merge.dense_attention_with_lse(q, k, v, 0.3),
                              q, k, v)
    d_out = rng.standard_normal(out.shape)
    d_lse = rng.standard_normal(lse.shape)
    grads = vjp((jnp.asarray(d_out, jnp.float32), jnp.asarray(d_lse, jnp.float32)))
    mask = np.ones((9, 5), bool)
    ref_out, ref_lse = np_attention(q, k, v, mask, 0.3)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, np_attention_vjp(q, k, v, mask, 0.3, d_out, d_lse)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_merge_of_key_partition_equals_dense_attention_and_its_gradients():
    """Three attentions over a random partition of the keys, merged, differentiated."""
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((1, 6, 2, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 12, 2, 4)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 12, 2, 4)), jnp.float32)
    parts = np.split(rng.permutation(12), [3, 8])

    def merged(q, k, v):
        outs, lses = zip(*(merge.dense_attention_with_lse(q, k[:, p], v[:, p], 0.5)
                           for p in parts))
        return merge.merge_attentions(outs, lses)

    (out, lse), vjp = jax.vjp(merged, q, k, v)
    d_out, d_lse = rng.standard_normal(out.shape), rng.standard_normal(lse.shape)
    grads = vjp((jnp.asarray(d_out, jnp.float32), jnp.asarray(d_lse, jnp.float32)))
    mask = np.ones((6, 12), bool)
    ref_out, ref_lse = np_attention(q, k, v, mask, 0.5)
    np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, np_attention_vjp(q, k, v, mask, 0.5, d_out, d_lse)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_merge_handles_empty_parts_without_nan():
    rng = np.random.default_rng(9)
    o1 = jnp.asarray(rng.standard_normal((3, 2, 4)), jnp.float32)
    o2 = jnp.asarray(rng.standard_normal((3, 2, 4)), jnp.float32)
    l1 = jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)
    # Row 0: part 2 empty. Row 1: part 1 empty. Row 2: both empty.
    l1 = l1.at[1].set(-jnp.inf).at[2].set(-jnp.inf)
    l2 = jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)
    l2 = l2.at[0].set(-jnp.inf).at[2].set(-jnp.inf)
    out, lse = merge.merge_attentions([o1, o2], [l1, l2])
    np.testing.assert_allclose(out[0], o1[0], rtol=1e-6)
    np.testing.assert_allclose(out[1], o2[1], rtol=1e-6)
    np.testing.assert_array_equal(out[2], 0.0)
    np.testing.assert_allclose(lse[0], l1[0], rtol=1e-6)
    np.testing.assert_allclose(lse[1], l2[1], rtol=1e-6)
    assert np.all(np.isneginf(lse[2]))

    def loss(o1, o2, l1, l2):
        out, lse = merge.merge_attentions([o1, o2], [l1, l2])
        return jnp.sum(out * 1.3) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(o1, o2, l1, l2)
    for g in grads:
        assert np.all(np.isfinite(g))
    # An empty part gets no gradient; a lone part passes the output cotangent through.
    np.testing.assert_array_equal(grads[1][0], 0.0)
    np.testing.assert_allclose(grads[0][0], 1.3, rtol=1e-6)
    np.testing.assert_array_equal(grads[0][2], 0.0)


def test_merge_lse_gradient_matches_softmax_weights():
    """d lse / d lse_i is the part's weight exp(lse_i - lse); checked in float64 numpy."""
    rng = np.random.default_rng(11)
    lses = [jnp.asarray(rng.standard_normal((5, 3)) * 4, jnp.float32) for _ in range(3)]
    outs = [jnp.asarray(rng.standard_normal((5, 3, 2)), jnp.float32) for _ in range(3)]
    grads = jax.grad(lambda ls: jnp.sum(merge.merge_attentions(outs, ls)[1]))(lses)
    stacked = np.stack([np.asarray(x, np.float64) for x in lses])
    weights = np.exp(stacked - np.log(np.exp(stacked).sum(0)))
    for g, w in zip(grads, weights):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_merge_keeps_first_dtype_and_float32_lse():
    rng = np.random.default_rng(1)
    o1 = jnp.asarray(rng.standard_normal((2, 2, 8)), jnp.bfloat16)
    o2 = jnp.asarray(rng.standard_normal((2, 2, 8)), jnp.bfloat16)
    l1 = jnp.asarray(rng.standard_normal((2, 2)), jnp.float32)
    l2 = jnp.asarray(rng.standard_normal((2, 2)) + 30.0, jnp.float32)  # dominates
    out, lse = merge.merge_attentions([o1, o2], [l1, l2])
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    want = np.log(np.exp(np.float64(l1)) + np.exp(np.float64(l2)))
    np.testing.assert_allclose(lse, want, rtol=1e-6)
    np.testing.assert_allclose(np.float32(out), np.float32(o2), atol=1e-2)


@pytest.mark.parametrize("outputs, lses, match", [
    ([], [], "at least one"),
    ([jnp.ones((2, 3))], [jnp.ones(2), jnp.ones(2)], "same length"),
    ([jnp.ones((2, 3)), jnp.ones((2, 4))], [jnp.ones(2), jnp.ones(2)], r"outputs\[1\]"),
    ([jnp.ones((2, 3))], [jnp.ones(3)], r"lses\[0\]"),
    ([jnp.ones(3)], [jnp.ones(())], "must be"),
])
def test_merge_rejects_bad_shapes(outputs, lses, match):
    with pytest.raises(ValueError, match=match):
        merge.merge_attentions(outputs, lses)


def test_merge_rejects_integer_inputs():
    with pytest.raises(TypeError, match=r"lses\[0\]"):
        merge.merge_attentions([jnp.ones((2, 3))], [jnp.ones(2, jnp.int32)])


def test_attend_additional_rejects_unknown_backend():
    q = jnp.ones((1, 4, 1, 2))
    with pytest.raises(ValueError, match="backend"):
        merge.attend_additional(q, q, jnp.zeros((1, 4, 1)), jnp.ones((1, 2, 1, 2)),
                                jnp.ones((1, 2, 1, 2)), 1.0, backend="flash")


def test_merge_is_exported():
    assert jax_gna.merge_attentions is merge.merge_attentions


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_cudnn_backend_matches_union_reference():
    spatial, cfg, heads, kv_heads, d = (8, 8), jax_gna.GNAConfig((3, 5)), 4, 2, 64
    q, k, v, ak, av = union_inputs(spatial, cfg, heads, kv_heads, d, 40, seed=21,
                                   dtype=jnp.bfloat16)
    scale = d ** -0.5
    gna_out, gna_lse = jax_gna.attention(q, k, v, cfg, implementation="reference",
                                         return_lse=True)
    out, lse = jax.jit(lambda *a: merge.attend_additional(*a, scale, backend="cudnn"))(
        q, gna_out, gna_lse, ak, av)
    ref_out, ref_lse = union_reference(q, k, v, ak, av, cfg, scale)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-2, rtol=1e-3)
