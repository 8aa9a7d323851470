"""The `xla` implementation: the shared battery plus tiling-specific checks."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import battery
import jax_gna
from jax_gna import geometry, xla


class TestXla(battery.GNABattery):
    implementation = "xla"

    def options(self, case: battery.Case) -> dict:
        # Default tiles cover a tiny test layout in one tile; small random tiles make three
        # in four cases span many tiles (full, partial and padded list entries, ragged edges).
        if case.slot % 4 == 0:
            return {}
        rng = np.random.default_rng(case.slot)
        q_tile, kv_tile = (tuple(int(rng.integers(1, 5)) for _ in case.shape) for _ in "qk")
        return dict(q_tile_shape=q_tile, kv_tile_shape=kv_tile)


# Cases whose tiles matter: dilation with ragged groups, causal strides, GQA, 1-D to 3-D.
_TILE_CASES = [battery.EDGE_CASES[i] for i in (11, 13, 17, 22, 25, 28)]


def _random_tiles(rng: np.random.Generator, case: battery.Case):
    """A random (q_tile, kv_tile): sizes from 1 to past the longest group of each axis."""
    longest = [-(-length // d) for length, d in zip(case.shape, case.dilation)]
    return tuple(tuple(int(rng.integers(1, lg + 3)) for lg in longest) for _ in range(2))


def _inputs(case: battery.Case, seed: int, d: int = 8):
    rng = np.random.default_rng(seed)
    lead = (case.batch, *case.shape)
    return [jnp.asarray(rng.standard_normal((*lead, h, d)), jnp.float32)
            for h in (case.heads, case.kv_heads, case.kv_heads)]


@pytest.mark.parametrize("case", _TILE_CASES, ids=lambda c: c.name)
def test_result_does_not_depend_on_tile_shape(case):
    q, k, v = _inputs(case, seed=1)
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    mask = battery.brute_mask(case.shape, case.kernel, case.stride, case.dilation, case.causal)
    n = math.prod(case.shape)
    out64, lse64 = battery.np_attention(q64.reshape(case.batch, n, case.heads, -1),
                            k64.reshape(case.batch, n, case.kv_heads, -1),
                            v64.reshape(case.batch, n, case.kv_heads, -1), mask, 8 ** -0.5)
    out64, lse64 = out64.reshape(q.shape), lse64.reshape(q.shape[:-1])
    rng = np.random.default_rng(2)
    dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    grads = []
    for _ in range(4):
        q_tile, kv_tile = _random_tiles(rng, case)

        def f(q, k, v, q_tile=q_tile, kv_tile=kv_tile):
            return jax_gna.attention(q, k, v, case.cfg, implementation="xla",
                                     return_lse=True, q_tile_shape=q_tile,
                                     kv_tile_shape=kv_tile)

        (out, lse), vjp = jax.vjp(jax.jit(f), q, k, v)
        chex.assert_trees_all_close((np.asarray(out, np.float64), np.asarray(lse, np.float64)),
                                    (out64, lse64), atol=2e-5, rtol=1e-5)
        grads.append(vjp((dout, jnp.zeros_like(lse))))
    for g in grads[1:]:
        chex.assert_trees_all_close(g, grads[0], atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("case", _TILE_CASES[:4], ids=lambda c: c.name)
def test_deterministic_backward_matches_and_repeats(case):
    q, k, v = _inputs(case, seed=3)
    rng = np.random.default_rng(4)
    dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    dlse = jnp.asarray(rng.standard_normal(q.shape[:-1]), jnp.float32)

    def grads(deterministic):
        f = lambda q, k, v: jax_gna.attention(  # noqa: E731
            q, k, v, case.cfg, implementation="xla", return_lse=True,
            deterministic=deterministic)
        return jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1]((dout, dlse)))(q, k, v)

    scatter, det, det_again = grads(False), grads(True), grads(True)
    chex.assert_trees_all_close(det, scatter, atol=5e-5, rtol=5e-5)
    chex.assert_trees_all_equal(det, det_again)


def _max_intermediate(jaxpr) -> int:
    """Largest element count of any value in `jaxpr` and its sub-jaxprs (scan bodies, ...)."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            biggest = max(biggest, math.prod(getattr(var.aval, "shape", ())))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    biggest = max(biggest, _max_intermediate(inner))
    return biggest


def test_memory_is_linear_in_tokens():
    """Forward and backward never hold an N x N array; their largest value grows like N."""
    sizes = {}
    for side in (32, 64):
        n = side * side
        x = jax.ShapeDtypeStruct((1, side, side, 1, 8), jnp.float32)
        cfg = jax_gna.GNAConfig((7, 7))

        def loss(q, k, v):
            # Fixed 8x8 tiles: per-step memory is N * tile, so the test sizes stay small.
            return jax_gna.attention(q, k, v, cfg, implementation="xla", q_tile_shape=(8, 8),
                                     kv_tile_shape=(8, 8)).sum()

        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, x, x).jaxpr
        sizes[n] = _max_intermediate(jaxpr)
        assert sizes[n] < n * n / 8, (n, sizes[n])
    small, large = sorted(sizes)
    assert sizes[large] <= sizes[small] * (large / small) * 1.25, sizes


def test_visits_only_needed_tiles():
    """The visit lists hold exactly the tile pairs the per-axis geometry calls visible."""
    axes = jax_gna.GNAConfig((9, 5), (2, 1), (1, 2), (True, False)).resolve((40, 23))
    plan = xla.make_plan(axes, 1.0, 8, (4, 3), (5, 2))
    visits = xla._visits(plan)
    counted = sum(int(visits[name].valid.sum()) for name in ("full", "partial"))
    per_axis = [geometry.padded_group_tiling(a, tq, tk)[0]
                for a, tq, tk in zip(axes, plan.q_tile, plan.kv_tile)]
    assert counted == math.prod(int(v.sum()) for v in per_axis)
    total = math.prod(v.size for v in per_axis)
    assert counted < total / 3  # a local window skips most tile pairs
    # The KV-major lists are the same pairs, transposed.
    counted_t = sum(int(visits[name].valid.sum()) for name in ("full_t", "partial_t"))
    assert counted_t == counted
    assert int(visits["full"].valid.sum()) > 0 and int(visits["partial"].valid.sum()) > 0


def test_default_tiles_come_from_geometry():
    axes = jax_gna.GNAConfig(5).resolve((30, 40))
    plan = xla.make_plan(axes, 1.0, 64)
    assert (plan.q_tile, plan.kv_tile) == geometry.default_tile_shapes(axes, 64, arch="xla")
