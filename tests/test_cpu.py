"""The native `cpu` implementation (C++ XLA FFI handler): the shared battery, a gradient sweep
over every battery config, agreement with `xla`, and the custom-call plumbing (jit, grad,
vmap, checkpoint, tile shapes, thread-count independence, the lse-cotangent composite).

Everything runs on JAX's CPU device, also on machines whose default backend is a GPU.
"""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import battery
import jax_gna
from jax_gna import geometry, native

_CPU = jax.devices("cpu")[0]

with jax.default_device(_CPU):  # the tests below run on the CPU device, GPU or not
    _UNAVAILABLE = native.cpu_unavailable()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None,
                                reason=f"implementation='cpu' unavailable: {_UNAVAILABLE}")


class _OnCpu:
    """Runs every test of the class on the CPU device."""

    def setUp(self):
        super().setUp()
        self.enter_context(jax.default_device(_CPU))


class TestCpu(_OnCpu, battery.GNABattery):
    implementation = "cpu"
    dtypes = ("float32", "bfloat16", "float16")
    supports_float64 = False

    @parameterized.named_parameters(*battery._named(battery.SWEEP_CASES))
    def test_gradient_sweep_matches_float64_autodiff(self, case):
        """Gradients (with an lse cotangent) over the same 200+ configs as the forward sweep."""
        dtype = self.dtype_of(case)
        (q, k, v), (q64, k64, v64) = self.inputs(case, dtype, seed=300 + case.slot)
        dout, dlse = self.cotangents(q, seed=400 + case.slot)
        fn = self.attention_fn(case)

        @jax.jit
        def grads(q, k, v):
            _, vjp = jax.vjp(fn, q, k, v)
            return vjp((jnp.asarray(dout, dtype), jnp.asarray(dlse, jnp.float32)))

        self.assert_close(grads(q, k, v),
                          self.expected_grads(case, q64, k64, v64, dout, dlse), dtype,
                          grads=True)


def _inputs(case: battery.Case, dtype, seed: int, head_dim: int = 8, lead=()):
    rng = np.random.default_rng(seed)
    shape = (*lead, case.batch, *case.shape)
    return [jnp.asarray(rng.standard_normal((*shape, h, head_dim)), dtype)
            for h in (case.heads, case.kv_heads, case.kv_heads)]


def _loss(impl: str, case: battery.Case, **kwargs):
    """A scalar that depends on both outputs, so gradients see both cotangents."""
    def loss(q, k, v):
        out, lse = jax_gna.attention(q, k, v, case.cfg, implementation=impl, return_lse=True,
                                     **kwargs)
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * w) + jnp.sum(jnp.sin(lse))
    return loss


_CASES = [battery.EDGE_CASES[i] for i in (7, 13, 17, 21, 25, 26)]


class CpuPlumbingTest(_OnCpu, chex.TestCase):
    """How the custom call composes with JAX transformations."""

    @parameterized.parameters(*_CASES)
    def test_matches_xla_forward_and_gradients(self, case):
        q, k, v = _inputs(case, jnp.float32, seed=1)
        for impl_out, xla_out in zip(
                jax.jit(jax.value_and_grad(_loss("cpu", case), argnums=(0, 1, 2)))(q, k, v),
                jax.jit(jax.value_and_grad(_loss("xla", case), argnums=(0, 1, 2)))(q, k, v)):
            chex.assert_trees_all_close(impl_out, xla_out, atol=5e-5, rtol=5e-5)

    def test_grad_eager_equals_jit_grad(self):
        case = battery.EDGE_CASES[17]
        q, k, v = _inputs(case, jnp.float32, seed=2)
        eager = jax.grad(_loss("cpu", case), argnums=(0, 1, 2))(q, k, v)
        jitted = jax.jit(jax.grad(_loss("cpu", case), argnums=(0, 1, 2)))(q, k, v)
        chex.assert_trees_all_close(eager, jitted, atol=1e-6, rtol=1e-6)

    def test_checkpoint(self):
        case = battery.EDGE_CASES[25]
        q, k, v = _inputs(case, jnp.float32, seed=3)
        plain = jax.jit(jax.grad(_loss("cpu", case), argnums=(0, 1, 2)))(q, k, v)
        remat = jax.jit(jax.grad(jax.checkpoint(_loss("cpu", case)), argnums=(0, 1, 2)))(q, k, v)
        chex.assert_trees_all_close(plain, remat, atol=1e-6, rtol=1e-6)
        reference = jax.jit(jax.grad(_loss("xla", case), argnums=(0, 1, 2)))(q, k, v)
        chex.assert_trees_all_close(remat, reference, atol=5e-5, rtol=5e-5)

    def test_nested_vmap_folds_into_one_call(self):
        case = battery.EDGE_CASES[17]
        q, k, v = _inputs(case, jnp.float32, seed=4, lead=(2, 3))
        fn = lambda q, k, v: jax_gna.attention(q, k, v, case.cfg, implementation="cpu",
                                               return_lse=True)
        # k and v are shared across the outer axis: unbatched operands are broadcast.
        out, lse = jax.jit(jax.vmap(jax.vmap(fn), in_axes=(0, None, None)))(q, k[0], v[0])
        for i in range(2):
            for j in range(3):
                ref_out, ref_lse = jax_gna.attention(q[i, j], k[0, j], v[0, j], case.cfg,
                                                     implementation="xla", return_lse=True)
                chex.assert_trees_all_close((out[i, j], lse[i, j]), (ref_out, ref_lse),
                                            atol=2e-5, rtol=2e-5)
        hlo = jax.jit(jax.vmap(jax.vmap(fn), in_axes=(0, None, None))).lower(
            q, k[0], v[0]).as_text()
        self.assertEqual(hlo.count("jax_gna_cpu_forward"), 1, "one custom call, no loop")
        self.assertNotIn("while", hlo)

    def test_vmap_of_grad_equals_grad_per_example(self):
        case = battery.EDGE_CASES[13]
        q, k, v = _inputs(case, jnp.float32, seed=5, lead=(3,))
        grad = jax.grad(_loss("cpu", case), argnums=(0, 1, 2))
        batched = jax.jit(jax.vmap(grad))(q, k, v)
        for i in range(3):
            chex.assert_trees_all_close(jax.tree_util.tree_map(lambda g: g[i], batched),
                                        grad(q[i], k[i], v[i]), atol=1e-6, rtol=1e-6)

    @parameterized.parameters(((4, 4, 4), (2, 4, 8)), ((1, 2, 8), (3, 1, 1)),
                              ((7, 5, 3), (2, 2, 2)))
    def test_tile_shape_does_not_change_the_result(self, q_tile, kv_tile):
        case = battery.EDGE_CASES[25]
        q, k, v = _inputs(case, jnp.float32, seed=6)
        default = jax.grad(_loss("cpu", case), argnums=(0, 1, 2))(q, k, v)
        tiled = jax.grad(_loss("cpu", case, q_tile_shape=q_tile, kv_tile_shape=kv_tile),
                         argnums=(0, 1, 2))(q, k, v)
        chex.assert_trees_all_close(default, tiled, atol=2e-5, rtol=2e-5)

    def test_bitwise_identical_for_any_thread_count(self):
        case = battery.Case((24, 20), (7, 5), (2, 1), (1, 2), (False, True), batch=2, heads=4,
                            kv_heads=2)
        q, k, v = _inputs(case, jnp.float32, seed=7, head_dim=16)
        results = []
        for threads in ("1", "3", "8"):
            os.environ["JAX_GNA_CPU_THREADS"] = threads
            try:
                # Thread count is read per call; a fresh function avoids the jit cache.
                results.append(jax.value_and_grad(
                    lambda *a: _loss("cpu", case)(*a), argnums=(0, 1, 2))(q, k, v))
            finally:
                del os.environ["JAX_GNA_CPU_THREADS"]
        for other in results[1:]:
            for a, b in zip(jax.tree_util.tree_leaves(results[0]),
                            jax.tree_util.tree_leaves(other)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def test_lse_cotangent_composite_matches_native(self):
        """The two-call lse-cotangent path that the `cuda` backward uses, checked on CPU."""
        case = battery.EDGE_CASES[21]
        q, k, v = _inputs(case, jnp.float32, seed=8)
        axes = case.cfg.resolve(case.shape)
        q_tile, kv_tile = geometry.default_tile_shapes(axes, q.shape[-1])
        frames = tuple(geometry.AxisFrame.whole(a.length) for a in axes)
        c = native._Call("cpu", axes, q.shape[-1] ** -0.5, q_tile, kv_tile, False, frames)
        out, lse = native._forward(c)(q, k, v)
        dlse = jnp.asarray(np.random.default_rng(9).standard_normal(lse.shape), jnp.float32)
        zeros = jnp.zeros_like(out)
        dq, dk, _ = native._backward(c, True)(q, k, v, out, lse, zeros, dlse)
        extra_dq, extra_dk = native._lse_cotangent_by_calls(c, c, q, k, v, out, lse, dlse)
        chex.assert_trees_all_close((extra_dq, extra_dk), (dq, dk), atol=2e-5, rtol=2e-5)
        self.assertGreater(float(jnp.abs(dk).max()), 1e-3)  # the check is not vacuous

    def test_half_precision_rounding_of_the_handler(self):
        """bf16/f16 outputs are the float32 result rounded to nearest even."""
        case = battery.EDGE_CASES[17]
        q32, k32, v32 = _inputs(case, jnp.float32, seed=10)
        for dtype in (jnp.bfloat16, jnp.float16):
            q, k, v = (x.astype(dtype) for x in (q32, k32, v32))
            out = jax_gna.attention(q, k, v, case.cfg, implementation="cpu")
            exact = jax_gna.attention(*(x.astype(jnp.float32) for x in (q, k, v)), case.cfg,
                                      implementation="cpu")
            np.testing.assert_array_equal(np.asarray(out), np.asarray(exact.astype(dtype)))

    def test_float64_is_rejected_with_a_clear_error(self):
        case = battery.EDGE_CASES[0]
        with jax.enable_x64(True):
            q, k, v = _inputs(case, jnp.float64, seed=11)
            with self.assertRaisesRegex(TypeError, "implementation='cpu' does not accept"):
                jax_gna.attention(q, k, v, case.cfg, implementation="cpu")


def test_conversions_round_to_nearest_even():
    ext = native._ext
    f16 = np.array([0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, 6e-8, 3e-8, 1e-5, 0.1, -2.5e-3,
                    np.inf, -np.inf, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11], np.float32)
    with np.errstate(over="ignore"):  # 65520 -> inf is the rounding under test
        expected = f16.astype(np.float16).astype(np.float32)
    for x, want in zip(f16, expected):
        np.testing.assert_array_equal(ext.f16_roundtrip(float(x)), want)
    assert np.isnan(ext.f16_roundtrip(float("nan")))
    bf16 = [0.0, 1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3.4e38, -1e-40, 0.1, np.inf]
    for x in bf16:
        np.testing.assert_array_equal(ext.bf16_roundtrip(float(x)),
                                      np.float32(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)))
    assert np.isnan(ext.bf16_roundtrip(float("nan")))
