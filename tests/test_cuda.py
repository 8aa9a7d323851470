"""The `cuda` implementation (sm80 CuTe kernels): the shared battery on a GPU, plus
bitwise-reproducible gradients and tile-shape variants the default tiles do not reach.

Every test here needs a CUDA GPU (``pytest.mark.gpu``) and skips cleanly without one.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import battery
import jax_gna

pytestmark = pytest.mark.gpu


class TestCuda(battery.GNABattery):
    implementation = "cuda"
    dtypes = ("bfloat16", "float16")
    head_dims = (32, 64, 128)
    supports_float64 = False
    pytestmark = pytest.mark.gpu


def _inputs(shape, heads, kv_heads, d, dtype, seed):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal((2, *shape, h, d)).astype(np.float32)
              for h in (heads, kv_heads, kv_heads)]
    return [jnp.asarray(x, dtype) for x in arrays]


def _grads(cfg, q, k, v, dout, **kwargs):
    def loss(q, k, v):
        out = jax_gna.attention(q, k, v, cfg, implementation="cuda", **kwargs)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_deterministic_backward_is_bitwise_reproducible(dtype):
    cfg = jax_gna.GNAConfig(kernel_size=(5, 7), stride=(2, 3), dilation=(1, 2),
                            is_causal=(True, False))
    q, k, v = _inputs((13, 17), 4, 2, 64, dtype, seed=0)
    dout = _inputs((13, 17), 4, 4, 64, dtype, seed=1)[0]
    first = _grads(cfg, q, k, v, dout, deterministic=True)
    for _ in range(3):
        again = _grads(cfg, q, k, v, dout, deterministic=True)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(np.asarray(a).view(np.uint16),
                                          np.asarray(b).view(np.uint16))
    # Reproducible and right: compare with float64 autodiff under the brute-force mask.
    mask = battery.brute_mask((13, 17), cfg.kernel_size, cfg.stride, cfg.dilation,
                                 cfg.is_causal)
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64).reshape(2, 13 * 17, x.shape[-2], 64))
               for x in (q, k, v, dout)]

        def ref_loss(q, k, v):
            out, _ = battery.jnp_dense_f64(q, k, v, mask, 64 ** -0.5)
            return jnp.sum(out * f64[3])
        ref = jax.grad(ref_loss, argnums=(0, 1, 2))(*f64[:3])
    for got, want in zip(first, ref):
        got = np.asarray(got, np.float64).reshape(want.shape)
        err = np.linalg.norm(got - np.asarray(want)) / np.linalg.norm(np.asarray(want))
        assert err < (4e-2 if dtype == "bfloat16" else 1e-2), err


@pytest.mark.parametrize("q_tile,kv_tile", [((3, 5), (2, 7)), ((4, 16), (8, 8)), ((1, 64), (2, 32))])
def test_odd_tile_boxes_match_reference(q_tile, kv_tile):
    """Explicit tile boxes (padding rows, the 64-row kernel variants) give the same result."""
    cfg = jax_gna.GNAConfig(kernel_size=(5, 9), stride=(1, 4), dilation=(2, 1),
                            is_causal=(False, True))
    q, k, v = _inputs((12, 19), 2, 1, 32, "bfloat16", seed=3)
    out, lse = jax_gna.attention(q, k, v, cfg, implementation="cuda", return_lse=True,
                                 q_tile_shape=q_tile, kv_tile_shape=kv_tile)
    mask = battery.brute_mask((12, 19), cfg.kernel_size, cfg.stride, cfg.dilation,
                                 cfg.is_causal)
    f64 = [np.asarray(x, np.float64).reshape(2, 12 * 19, x.shape[-2], 32) for x in (q, k, v)]
    want_out, want_lse = battery.np_attention(*f64, mask, 32 ** -0.5)
    chex.assert_trees_all_close(np.asarray(out, np.float64).reshape(want_out.shape), want_out,
                                atol=2e-2, rtol=2e-2)
    chex.assert_trees_all_close(np.asarray(lse, np.float64).reshape(want_lse.shape), want_lse,
                                atol=1e-2, rtol=1e-2)
