"""The shared test battery: every GNA implementation passes the same tests.

Hooks (class attributes a subclass sets)
----------------------------------------
``implementation`` (str, required)
    The ``implementation=`` name under test.
``dtypes`` (tuple of dtype names)
    Input dtypes to test. The sweep cycles through them: every other config uses
    ``dtypes[0]`` (put the most precise first), the rest cycle through ``dtypes[1:]``.
``supports_float64`` (bool)
    Also run the float64 test (enables x64 inside that test only).
``head_dims`` (tuple of ints)
    Head dims to test; the sweep cycles through them.
``supports_grad`` (bool)
    False for a forward-only implementation: the gradient tests then skip, saying why.
``tolerances``, ``grad_tolerances`` (dict: dtype name -> ``dict(atol=, rtol=)``)
    Override the defaults below if an implementation legitimately rounds differently.
``options(case)`` (method)
    Extra keyword arguments for `jax_gna.attention` in the sweep, gradient and vmap tests,
    e.g. small ``q_tile_shape``/``kv_tile_shape`` so that tiny test layouts still span many
    tiles. Default: none.

Use it from a test module like this (import the *module*, never the class name, or pytest
collects the base class itself)::

    import pytest
    import battery

    class TestCuda(battery.GNABattery):
        implementation = "cuda"
        dtypes = ("bfloat16", "float16")
        head_dims = (32, 64, 128)
        supports_float64 = False
        pytestmark = pytest.mark.gpu

What it checks: ``out`` and ``lse`` against an independent float64 numpy brute force written
here straight from DESIGN.md §2 (it does not call `jax_gna.geometry`) over a seeded sweep of
more than 200 1-D/2-D/3-D configs and fixed edge cases; gradients (including an ``lse``
cotangent) against float64 autodiff of dense attention under the brute-force mask; ``vmap``
over an extra batch axis; jit vs no-jit (`chex.variants`); NaN-freedom at large logits;
non-default scale; the ``na1d/na2d/na3d`` wrappers.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import jax_gna

# ----------------------------------------------------------------------------------------
# Independent statement of the rule (DESIGN.md §2), float64 numpy, one query at a time.
# ----------------------------------------------------------------------------------------


def brute_axis_keys(i: int, length: int, kernel: int, stride: int, dilation: int,
                    causal: bool) -> list[int]:
    """Key coordinates that query coordinate `i` sees on one axis (``kernel=-1``: whole axis)."""
    if kernel == -1:
        kernel = length
    g, ii = i % dilation, i // dilation
    group_len = -(-(length - g) // dilation)
    if causal:
        lead = min((ii // stride) * stride + stride - 1, group_len - 1)
        first = max(lead - kernel + 1, 0)
        last = ii                                   # the window ends at the query itself
    else:
        lead = min((ii // stride) * stride + stride // 2, group_len - 1)
        first = min(max(lead - kernel // 2, 0), group_len - kernel)
        last = first + kernel - 1
    return [jj * dilation + g for jj in range(first, last + 1)]


def brute_mask(shape, kernel, stride, dilation, causal) -> np.ndarray:
    """``[N, N]`` bool, row-major tokens, built query by query from `brute_axis_keys`."""
    n = math.prod(shape)
    mask = np.zeros((n, n), dtype=bool)
    for row, query in enumerate(itertools.product(*(range(s) for s in shape))):
        per_axis = [brute_axis_keys(i, length, *params)
                    for i, length, params in zip(query, shape,
                                                 zip(kernel, stride, dilation, causal))]
        for key in itertools.product(*per_axis):
            mask[row, np.ravel_multi_index(key, shape)] = True
    return mask


def np_attention(q, k, v, mask, scale):
    """Dense masked attention in float64 numpy.

    ``q [B, N, H, D]``, ``k, v [B, N, H_kv, D]``, ``mask [N, N]`` -> ``out [B, N, H, D]``,
    ``lse [B, N, H]``.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bnhd,bmhd->bhnm", q, k) * scale
    s = np.where(mask, s, -np.inf)
    top = s.max(axis=-1, keepdims=True)
    p = np.exp(s - top)
    total = p.sum(axis=-1, keepdims=True)
    out = np.einsum("bhnm,bmhd->bnhd", p / total, v)
    lse = (np.log(total) + top)[..., 0]
    return out, lse.transpose(0, 2, 1)


def jnp_dense_f64(q, k, v, mask, scale):
    """The same dense attention in jnp (call under ``jax.enable_x64``) for autodiff."""
    b, n, h, d = q.shape
    h_kv = k.shape[2]
    qh = q.reshape(b, n, h_kv, h // h_kv, d)
    s = jnp.einsum("bnkgd,bmkd->bkgnm", qh, k) * scale
    s = jnp.where(mask, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    out = jnp.einsum("bkgnm,bmkd->bnkgd", p, v).reshape(b, n, h, d)
    return out, jnp.moveaxis(lse.reshape(b, h, n), 1, -1)


@functools.partial(jax.jit, static_argnames="scale")
def _dense_vjp_f64(q, k, v, mask, dout, dlse, scale):
    """Autodiff VJP of `jnp_dense_f64` (jitted once per shape; call under x64)."""
    _, vjp = jax.vjp(lambda q, k, v: jnp_dense_f64(q, k, v, mask, scale), q, k, v)
    return vjp((dout, dlse))


# ----------------------------------------------------------------------------------------
# Cases.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One problem: layout, config, batch and heads. `slot` picks dtype and head dim."""

    shape: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]
    batch: int = 1
    heads: int = 2
    kv_heads: int = 1
    slot: int = 0

    @property
    def cfg(self) -> jax_gna.GNAConfig:
        return jax_gna.GNAConfig(self.kernel, self.stride, self.dilation, self.causal)

    @property
    def name(self) -> str:
        def j(t):
            return "x".join(str(int(x)) for x in t)
        return (f"L{j(self.shape)}_k{j(self.kernel)}_s{j(self.stride)}_d{j(self.dilation)}"
                f"_c{j(self.causal)}_b{self.batch}h{self.heads}kv{self.kv_heads}")


_HEADS = ((2, 1), (2, 2), (3, 1), (4, 2), (1, 1), (6, 3))    # (H, H_kv): GQA, MHA, MQA


def _edge(shape, kernel, stride=None, dilation=None, causal=None, *, slot) -> Case:
    rank = len(shape)
    heads, kv_heads = _HEADS[slot % len(_HEADS)]
    return Case(tuple(shape), tuple(kernel), tuple(stride or (1,) * rank),
                tuple(dilation or (1,) * rank), tuple(bool(c) for c in (causal or (0,) * rank)),
                batch=1 + slot % 2, heads=heads, kv_heads=kv_heads, slot=slot)


_EDGE_SPECS = [
    # 1-D
    ((7,), (7,)),                                  # k = L: plain self-attention
    ((7,), (-1,)),                                 # -1: whole axis
    ((10,), (10,), None, None, (1,)),              # k = L, causal
    ((12,), (4,), (4,)),                           # s = k, L % k == 0: block diagonal
    ((13,), (4,), (4,)),                           # s = k, ragged last block
    ((12,), (4,), None, (3,)),                     # k * d = L
    ((13,), (3,), None, (4,)),                     # L % d != 0
    ((16,), (6,), (3,), None, (1,)),               # causal with stride
    ((16,), (5,), (5,), None, (1,)),               # causal, s = k
    ((9,), (2,)),                                  # smallest window
    ((2,), (2,)),                                  # smallest axis
    ((17,), (8,), None, (2,), (1,)),               # causal, dilation, ragged groups
    ((33,), (6,)),                                 # even window
    ((40,), (9,), (4,), (3,)),                     # stride + dilation, 40 % 3 != 0
    # 2-D
    ((8, 8), (8, 8)),
    ((8, 12), (4, 4), (4, 4)),
    ((9, 10), (3, 5), None, (3, 2)),               # k * d = L on both axes
    ((10, 7), (4, 3), (2, 3), (2, 2), (1, 0)),
    ((7, 11), (6, 4), (3, 1), None, (1, 1)),
    ((6, 5), (-1, 2)),
    ((16, 3), (5, 3)),
    ((2, 9), (2, 3), (2, 2)),
    ((11, 13), (4, 6), (4, 3), (2, 2), (0, 1)),
    # 3-D
    ((4, 6, 5), (2, 3, 5), None, None, (1, 0, 0)),
    ((6, 6, 6), (3, 3, 3), (3, 3, 3)),
    ((5, 8, 7), (2, 4, 3), (1, 2, 3), (2, 2, 2), (0, 1, 1)),
    ((3, 4, 9), (3, 2, 3), None, (1, 2, 3)),
    ((2, 2, 2), (2, 2, 2)),
    ((7, 5, 6), (-1, 4, 2), (7, 2, 2), None, (1, 0, 1)),
]
EDGE_CASES = [_edge(*spec, slot=i) for i, spec in enumerate(_EDGE_SPECS)]

_KINDS = ("plain", "s=k", "k=L", "kd=L", "causal+stride", "dilation_ragged", "even_window")
_LENGTHS = {1: (2, 40), 2: (2, 12), 3: (2, 7)}


def _random_axis(rng: np.random.Generator, length: int, kind: str):
    """``(kernel, stride, dilation, causal)`` of one axis, shaped by `kind` where possible."""
    divisors = [d for d in range(2, length // 2 + 1) if length % d == 0]
    ragged = [d for d in (2, 3) if length % d and length // d >= 2]
    causal = bool(rng.random() < 0.3)
    if kind == "k=L":
        kernel = length if rng.random() < 0.5 else -1
        return kernel, int(rng.integers(1, length + 1)), 1, causal
    if kind == "kd=L" and divisors:
        d = int(rng.choice(divisors))
        return length // d, int(rng.integers(1, length // d + 1)), d, causal
    if kind == "dilation_ragged" and ragged:
        d = int(rng.choice(ragged))
    elif length >= 4 and rng.random() < 0.3:
        d = int(rng.integers(2, min(3, length // 2) + 1))
    else:
        d = 1
    kmax = length // d
    kernel = int(rng.integers(2, kmax + 1))
    if kind == "even_window" and kmax >= 2:
        kernel = 2 * int(rng.integers(1, kmax // 2 + 1))
    stride = int(rng.integers(1, kernel + 1)) if rng.random() < 0.5 else 1
    if kind == "s=k":
        stride = kernel
    if kind == "causal+stride":
        causal, stride = True, int(rng.integers(min(2, kernel), kernel + 1))
    return kernel, stride, d, causal


def random_cases(count: int, seed: int, first_slot: int = 0) -> list[Case]:
    """`count` seeded random cases cycling over ranks and kinds (see `_KINDS`)."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        rank = 1 + i % 3
        kind = _KINDS[(i // 3) % len(_KINDS)]
        lo, hi = _LENGTHS[rank]
        shape = tuple(int(rng.integers(lo, hi + 1)) for _ in range(rank))
        # The kind shapes the first axis always and each other axis half of the time.
        axes = [_random_axis(rng, length, kind if a == 0 or rng.random() < 0.5 else "plain")
                for a, length in enumerate(shape)]
        kernel, stride, dilation, causal = (tuple(x) for x in zip(*axes))
        heads, kv_heads = _HEADS[int(rng.integers(len(_HEADS)))]
        cases.append(Case(shape, kernel, stride, dilation, causal,
                          batch=int(rng.integers(1, 3)), heads=heads, kv_heads=kv_heads,
                          slot=first_slot + i))
    return cases


SWEEP_CASES = EDGE_CASES + random_cases(180, seed=20261126, first_slot=len(EDGE_CASES))
GRAD_CASES = ([EDGE_CASES[i] for i in (5, 7, 11, 13, 17, 21, 25, 28)]
              + random_cases(10, seed=7, first_slot=1))
VARIANT_CASES = [EDGE_CASES[i] for i in (7, 17, 25)]


def _named(cases: list[Case]) -> list[dict]:
    return [dict(testcase_name=f"{i:03d}_{c.name}", case=c) for i, c in enumerate(cases)]


# ----------------------------------------------------------------------------------------
# The battery.
# ----------------------------------------------------------------------------------------

_TOLERANCES = {
    "float32": dict(atol=2e-5, rtol=1e-5),
    "bfloat16": dict(atol=2e-2, rtol=2e-2),
    "float16": dict(atol=4e-3, rtol=4e-3),
    "float64": dict(atol=1e-10, rtol=1e-10),
}
_GRAD_TOLERANCES = {
    "float32": dict(atol=5e-5, rtol=5e-5),
    "bfloat16": dict(atol=5e-2, rtol=5e-2),
    "float16": dict(atol=1e-2, rtol=1e-2),
    "float64": dict(atol=1e-9, rtol=1e-9),
}


class GNABattery(chex.TestCase):
    """Tests every implementation must pass; see the module docstring for the hooks."""

    implementation: str | None = None
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    supports_float64: bool = True
    head_dims: tuple[int, ...] = (8, 4, 16, 5)
    supports_grad: bool = True
    tolerances: dict = _TOLERANCES
    grad_tolerances: dict = _GRAD_TOLERANCES

    # -- helpers ------------------------------------------------------------------------

    def setUp(self):
        super().setUp()
        if self.implementation is None:
            raise TypeError(f"{type(self).__name__} must set `implementation`")

    def dtype_of(self, case: Case) -> str:
        if case.slot % 2 == 0 or len(self.dtypes) == 1:
            return self.dtypes[0]
        return self.dtypes[1 + (case.slot // 2) % (len(self.dtypes) - 1)]

    def head_dim_of(self, case: Case) -> int:
        return self.head_dims[case.slot % len(self.head_dims)]

    def inputs(self, case: Case, dtype: str, seed: int, extra_batch: tuple[int, ...] = ()):
        """Seeded random ``q, k, v`` in `dtype` (jax) and the same values in float64 numpy."""
        rng = np.random.default_rng(seed)
        d = self.head_dim_of(case)
        lead = (*extra_batch, case.batch, *case.shape)
        arrays = [rng.standard_normal((*lead, h, d)).astype(np.float32)
                  for h in (case.heads, case.kv_heads, case.kv_heads)]
        jax_arrays = [jnp.asarray(x, dtype) for x in arrays]
        return jax_arrays, [np.asarray(x, np.float64) for x in jax_arrays]

    def expected(self, case: Case, q, k, v, scale=None):
        """float64 ``(out, lse)`` from the brute-force mask, q/k/v as float64 numpy."""
        mask = brute_mask(case.shape, case.kernel, case.stride, case.dilation, case.causal)
        b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
        n = math.prod(case.shape)
        scale = d ** -0.5 if scale is None else scale
        out, lse = np_attention(q.reshape(b, n, h, d), k.reshape(b, n, -1, d),
                                v.reshape(b, n, -1, d), mask, scale)
        return out.reshape(q.shape), lse.reshape(q.shape[:-1])

    def options(self, case: Case) -> dict:
        """Hook: extra `jax_gna.attention` keyword arguments for `case`."""
        del case
        return {}

    def attention_fn(self, case: Case, **kwargs):
        kwargs = {**self.options(case), **kwargs}
        return lambda q, k, v: jax_gna.attention(q, k, v, case.cfg,
                                                 implementation=self.implementation,
                                                 return_lse=True, **kwargs)

    def assert_close(self, actual, expected, dtype: str, grads: bool = False, factor=1.0):
        tol = (self.grad_tolerances if grads else self.tolerances)[dtype]
        actual = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), actual)
        chex.assert_trees_all_close(actual, expected, atol=tol["atol"] * factor,
                                    rtol=tol["rtol"] * factor)

    def require_grad(self):
        if not self.supports_grad:
            self.skipTest(f"implementation {self.implementation!r} is forward-only")

    # -- forward ------------------------------------------------------------------------

    @parameterized.named_parameters(*_named(SWEEP_CASES))
    def test_sweep_matches_float64_brute_force(self, case: Case):
        dtype = self.dtype_of(case)
        (q, k, v), (q64, k64, v64) = self.inputs(case, dtype, seed=case.slot)
        out, lse = jax.jit(self.attention_fn(case))(q, k, v)
        self.assertEqual(out.shape, q.shape)
        self.assertEqual(out.dtype, q.dtype)
        self.assertEqual(lse.shape, q.shape[:-1])
        self.assertEqual(lse.dtype, jnp.float32)
        self.assert_close((out, lse), self.expected(case, q64, k64, v64), dtype)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*_named(VARIANT_CASES))
    def test_jit_and_eager(self, case: Case):
        dtype = self.dtypes[0]
        (q, k, v), (q64, k64, v64) = self.inputs(case, dtype, seed=11)
        out, lse = self.variant(self.attention_fn(case))(q, k, v)
        self.assert_close((out, lse), self.expected(case, q64, k64, v64), dtype)

    @parameterized.named_parameters(*_named(VARIANT_CASES))
    def test_vmap_over_extra_batch_axis(self, case: Case):
        dtype = self.dtypes[0]
        (q, k, v), (q64, k64, v64) = self.inputs(case, dtype, seed=12, extra_batch=(3,))
        out, lse = jax.jit(jax.vmap(self.attention_fn(case)))(q, k, v)
        expected = [self.expected(case, q64[i], k64[i], v64[i]) for i in range(3)]
        expected = tuple(np.stack(x) for x in zip(*expected))
        self.assert_close((out, lse), expected, dtype)

    def test_large_logits_stay_finite(self):
        case = EDGE_CASES[17]
        dtype = self.dtypes[0]
        (q, k, v), (q64, k64, v64) = self.inputs(case, dtype, seed=13)
        # Scores of several hundred: a naive exp would overflow.
        q, q64 = q * 40, q64 * 40
        out, lse = jax.jit(self.attention_fn(case))(q, k, v)
        self.assertTrue(bool(jnp.isfinite(out).all() & jnp.isfinite(lse).all()))
        exp_out, exp_lse = self.expected(case, q64, k64, v64)
        self.assert_close(out, exp_out, dtype, factor=10)
        # lse is in the hundreds here: compare relative to its size.
        np.testing.assert_allclose(np.asarray(lse, np.float64), exp_lse,
                                   rtol=10 * self.tolerances[dtype]["rtol"])

    def test_custom_scale(self):
        # Kernels fold a positive scale into the exponent; zero and negative scales take
        # another path.
        case = EDGE_CASES[22]
        dtype = self.dtypes[0]
        (q, k, v), (q64, k64, v64) = self.inputs(case, dtype, seed=14)
        for scale in (0.37, -0.37, 0.0):
            out, lse = jax.jit(self.attention_fn(case, scale=scale))(q, k, v)
            self.assert_close((out, lse), self.expected(case, q64, k64, v64, scale=scale),
                              dtype)

    def test_na_wrappers_match_attention(self):
        for case, na in ((EDGE_CASES[13], jax_gna.na1d), (EDGE_CASES[17], jax_gna.na2d),
                         (EDGE_CASES[25], jax_gna.na3d)):
            dtype = self.dtypes[0]
            (q, k, v), (q64, k64, v64) = self.inputs(case, dtype, seed=15)
            out = na(q, k, v, case.kernel, case.stride, case.dilation, case.causal,
                     implementation=self.implementation)
            self.assert_close(out, self.expected(case, q64, k64, v64)[0], dtype)

    def test_float64_inputs(self):
        if not self.supports_float64:
            self.skipTest(f"implementation {self.implementation!r} does not take float64")
        with jax.enable_x64(True):
            for case in (EDGE_CASES[11], EDGE_CASES[17], EDGE_CASES[25]):
                (q, k, v), (q64, k64, v64) = self.inputs(case, "float64", seed=16)
                out, lse = jax.jit(self.attention_fn(case))(q, k, v)
                self.assertEqual(out.dtype, jnp.float64)
                self.assert_close(out, self.expected(case, q64, k64, v64)[0], "float64")
                # lse is float32 by contract.
                self.assert_close(lse, self.expected(case, q64, k64, v64)[1], "float32")

    # -- gradients ----------------------------------------------------------------------

    def expected_grads(self, case: Case, q64, k64, v64, dout, dlse):
        """float64 autodiff of dense attention under the brute-force mask."""
        mask = brute_mask(case.shape, case.kernel, case.stride, case.dilation, case.causal)
        b, h, d = q64.shape[0], q64.shape[-2], q64.shape[-1]
        n = math.prod(case.shape)
        with jax.enable_x64(True):
            as64 = lambda x: jnp.asarray(x, jnp.float64).reshape(b, n, *x.shape[-2:])  # noqa
            grads = _dense_vjp_f64(as64(q64), as64(k64), as64(v64), jnp.asarray(mask),
                                   as64(dout), jnp.asarray(dlse, jnp.float64).reshape(b, n, h),
                                   d ** -0.5)
            return tuple(np.asarray(g).reshape(x.shape) for g, x in zip(grads, (q64, k64, v64)))

    def cotangents(self, q, seed: int):
        rng = np.random.default_rng(seed)
        dout = np.asarray(jnp.asarray(rng.standard_normal(q.shape), q.dtype), np.float64)
        dlse = rng.standard_normal(q.shape[:-1]).astype(np.float32).astype(np.float64)
        return dout, dlse

    @parameterized.named_parameters(*_named(GRAD_CASES))
    def test_gradients_match_float64_autodiff(self, case: Case):
        self.require_grad()
        dtype = self.dtype_of(case)
        (q, k, v), (q64, k64, v64) = self.inputs(case, dtype, seed=100 + case.slot)
        dout, dlse = self.cotangents(q, seed=200 + case.slot)

        @jax.jit
        def grads(q, k, v):
            _, vjp = jax.vjp(self.attention_fn(case), q, k, v)
            return vjp((jnp.asarray(dout, dtype), jnp.asarray(dlse, jnp.float32)))

        actual = grads(q, k, v)
        for g, x in zip(actual, (q, k, v)):
            self.assertEqual(g.shape, x.shape)
            self.assertEqual(g.dtype, x.dtype)
        self.assert_close(actual, self.expected_grads(case, q64, k64, v64, dout, dlse), dtype,
                          grads=True)

    def test_gradients_under_vmap(self):
        self.require_grad()
        case = EDGE_CASES[17]
        dtype = self.dtypes[0]
        (q, k, v), (q64, k64, v64) = self.inputs(case, dtype, seed=17, extra_batch=(2,))
        dout, _ = self.cotangents(q, seed=18)

        def loss(q, k, v):
            out, _ = jax.vmap(self.attention_fn(case))(q, k, v)
            return jnp.sum(out.astype(jnp.float32) * jnp.asarray(dout, jnp.float32))

        actual = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        zeros = np.zeros(q.shape[1:-1])
        expected = [self.expected_grads(case, q64[i], k64[i], v64[i], dout[i], zeros)
                    for i in range(2)]
        expected = tuple(np.stack(x) for x in zip(*expected))
        self.assert_close(actual, expected, dtype, grads=True)
