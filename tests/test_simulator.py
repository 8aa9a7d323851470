"""Simulator and configuration finder against known values and a brute force over the mask.

The brute force knows only the semantics (`neighborhood_mask`) and the tiling convention
(tiles are boxes of dilation-group indices); it never calls the tile geometry.
"""

import math
import time

import numpy as np
import pytest

import jax_gna
from jax_gna import GNAConfig, simulator


# ----------------------------------------------------------------------------------------
# Brute force.
# ----------------------------------------------------------------------------------------

def _tile_ids(shape, dilation, tile):
    """Per token (row-major), the id of its tile: (group, group index // tile) per axis."""
    coords = np.unravel_index(np.arange(math.prod(shape)), shape)
    keys = []
    for c, d, t in zip(coords, dilation, tile):
        keys += [c % d, (c // d) // t]
    _, ids = np.unique(np.stack(keys, axis=1), axis=0, return_inverse=True)
    return ids.ravel()


def _one_hot(ids):
    out = np.zeros((ids.max() + 1, ids.size))
    out[ids, np.arange(ids.size)] = 1.0
    return out


def brute_force(shape, cfg, q_tile, kv_tile):
    """Tile counts from the dense mask: seen pairs per tile pair by two matrix products."""
    axes = cfg.resolve(shape)
    dil = [a.dilation for a in axes]
    mask = jax_gna.neighborhood_mask(shape, cfg).astype(np.float64)
    aq = _one_hot(_tile_ids(shape, dil, q_tile))
    ak = _one_hot(_tile_ids(shape, dil, kv_tile))
    seen = aq @ mask @ ak.T
    size = aq.sum(1)[:, None] * ak.sum(1)[None, :]
    kv_unpadded = ak.sum(1)[None, :] == math.prod(kv_tile)
    visited = seen > 0
    clean = visited & (seen == size)
    dense = math.prod(a.dilation * -(-(-(-a.length // a.dilation)) // t)
                      for a, t in zip(axes, q_tile))
    dense *= math.prod(a.dilation * -(-(-(-a.length // a.dilation)) // t)
                       for a, t in zip(axes, kv_tile))
    return dict(
        neighborhood_size=int(mask.sum()),
        visited_tiles=int(visited.sum()),
        full_tiles=int((clean & kv_unpadded).sum()),
        masked_tiles=int((visited & ~clean).sum()),
        block_sparse=bool((visited <= clean).all()),
        dense_tile_pairs=dense,
        flop_speedup=mask.size / mask.sum(),
        seen=seen, size=size, aq=aq, ak=ak)


def _random_problem(rng):
    rank = int(rng.integers(1, 4))
    max_len = {1: 96, 2: 14, 3: 7}[rank]
    shape, ks, ss, ds, cs, tq, tk = [], [], [], [], [], [], []
    for _ in range(rank):
        length = int(rng.integers(2, max_len + 1))
        d = int(rng.integers(1, 4)) if rng.random() < 0.3 else 1
        d = max(1, min(d, length // 2))
        k = int(rng.integers(2, length // d + 1))
        s = int(rng.integers(1, k + 1)) if rng.random() < 0.6 else k
        shape.append(length)
        ks.append(k)
        ss.append(s)
        ds.append(d)
        cs.append(bool(rng.random() < 0.25))
        # Tiles that often divide strides and windows, so block-sparse cases come up.
        tq.append(int(rng.choice([1, 2, 3, 4, 8])))
        tk.append(int(rng.choice([1, 2, 4, 8])))
    cfg = GNAConfig(tuple(ks), tuple(ss), tuple(ds), tuple(cs))
    return tuple(shape), cfg, tuple(tq), tuple(tk)


def _block_problem(rng):
    """A blocked (s = k) config whose windows sit on tile boundaries: block-sparse."""
    rank = int(rng.integers(1, 4))
    shape, ks, tq, tk = [], [], [], []
    for _ in range(rank):
        t = int(rng.choice([1, 2, 4]))
        k = t * int(rng.integers(1, 4))
        k = max(k, 2)
        shape.append(k * int(rng.integers(1, {1: 6, 2: 3, 3: 2}[rank] + 1)))
        ks.append(k)
        tq.append(t)
        tk.append(t)
    return tuple(shape), GNAConfig(tuple(ks), tuple(ks)), tuple(tq), tuple(tk)


# ----------------------------------------------------------------------------------------
# Known values.
# ----------------------------------------------------------------------------------------

def test_flux_4k_gna_known_value():
    r = jax_gna.simulate((256, 256), GNAConfig((80, 80), (16, 16)), q_tile_shape=(16, 16),
                         kv_tile_shape=(16, 8))
    assert r.flop_speedup == pytest.approx(10.24, rel=1e-12)
    assert r.tile_speedup == pytest.approx(10.24, rel=1e-12)
    assert r.block_sparse and r.partial_tiles == 0 and r.masked_tiles == 0


def test_1d_32k_gna_known_value():
    r = jax_gna.simulate((32768,), GNAConfig(2048, 256), q_tile_shape=(256,),
                         kv_tile_shape=(128,))
    assert r.flop_speedup == pytest.approx(16.0, rel=1e-12)
    assert r.tile_speedup == pytest.approx(16.0, rel=1e-12)
    assert r.block_sparse and r.partial_fraction == 0.0


def test_neighborhood_attention_is_not_block_sparse():
    r = jax_gna.simulate((256, 256), GNAConfig((80, 80), 1), q_tile_shape=(16, 16),
                         kv_tile_shape=(16, 8))
    assert r.flop_speedup == pytest.approx(10.24, rel=1e-12)
    assert not r.block_sparse
    assert 1.0 < r.tile_speedup < r.flop_speedup
    assert 0.0 < r.partial_fraction < 1.0


def test_default_tiles_follow_geometry():
    axes = GNAConfig((18, 24, 24), (16, 8, 8)).resolve((30, 48, 80))
    r = jax_gna.simulate((30, 48, 80), GNAConfig((18, 24, 24), (16, 8, 8)))
    assert (r.q_tile_shape, r.kv_tile_shape) == jax_gna.geometry.default_tile_shapes(axes)


@pytest.mark.parametrize("shape, window, stride, want", [
    # Hunyuan NA: the box 2x8x8 sees 19x31x31 tokens, 8x4x4 sees 25x27x27.
    ((30, 48, 80), (18, 24, 24), (1, 1, 1), ((8, 4, 4), (2, 8, 4))),
    # Hunyuan GNA is block-sparse with the first candidate, so it keeps it.
    ((30, 48, 80), (18, 24, 24), (16, 8, 8), ((2, 8, 8), (2, 4, 8))),
    ((16, 32, 32), (7, 7, 7), (1, 1, 1), ((4, 8, 4), (4, 4, 4))),
    # FLUX-4K NA and GNA keep the first 2-D candidate; window 21 and window 7 do not.
    ((256, 256), (80, 80), (1, 1), ((8, 16), (8, 8))),
    ((256, 256), (80, 80), (16, 16), ((8, 16), (8, 8))),
    ((128, 128), (21, 21), (1, 1), ((8, 16), (4, 16))),
    ((64, 64), (7, 7), (1, 1), ((4, 32), (4, 16))),
    # KV 4x16 visits 8 % fewer pairs on 72x72 but does not divide 72 (gathered rows): the
    # first stays. On 120x120 it visits 13 % fewer, and is picked all the same.
    ((72, 72), (21, 21), (1, 1), ((8, 16), (8, 8))),
    ((120, 120), (21, 21), (1, 1), ((8, 16), (4, 16))),
])
def test_default_tiles_of_known_problems(shape, window, stride, want):
    axes = GNAConfig(window, stride).resolve(shape)
    assert jax_gna.geometry.default_tile_shapes(axes) == want


@pytest.mark.parametrize("sizes", [((6, 24), (12, 48)), ((4, 14), (6, 20), (6, 20))])
def test_default_tiles_are_the_menus_least_cost_by_brute_force(sizes):
    """The pick against visited pairs counted on the dense mask, weighted up where a KV tile
    leaves a partial box at some axis's end (its rows are gathered)."""
    rng = np.random.default_rng()
    weight = jax_gna.geometry._UNDIVIDED_KV_COST["sm80"]
    picked = set()
    for trial in range(12):
        shape = tuple(int(rng.integers(lo, hi)) for lo, hi in sizes)
        window = tuple(int(rng.integers(2, n + 1)) for n in shape)
        dilation = tuple(int(rng.integers(1, 3)) if n >= 2 * k else 1
                         for n, k in zip(shape, window))
        cfg = GNAConfig(window, tuple(int(rng.integers(1, min(k, 3) + 1)) for k in window),
                        dilation)
        axes = cfg.resolve(shape)
        menu = jax_gna.geometry.tile_menu(axes)
        costs = []
        for q, kv in menu:
            # Whole boxes only, in dilation groups of one length (a TMA map's element stride).
            whole = (all(n % d == 0 for n, d in zip(shape, dilation)) and
                     all(np.bincount(_tile_ids(shape, dilation, kv)) == math.prod(kv)))
            costs.append(brute_force(shape, cfg, q, kv)["visited_tiles"] * (1 if whole else weight))
        chosen = jax_gna.geometry.default_tile_shapes(axes)
        where = f"trial {trial}: {shape} {cfg} menu {menu} costs {costs}"
        assert chosen == menu[costs.index(min(costs))], where
        picked.add(menu.index(chosen))
    assert len(picked) >= 2, picked


@pytest.mark.parametrize("q_tile, kv_tile, want", [
    ((8, 16), (8, 8), (8, 16)),        # the fastest axis where the KV tile is half the Q tile
    ((8, 16), (16, 4), (16, 8)),
    ((8, 4, 4), (2, 8, 4), (4, 8, 4)),
    ((128,), (64,), (128,)),
    ((4, 4), (8, 8), (8, 16)),         # else the axis of most KV tiles (48 / 8 against 96 / 8)
    ((4, 4), (8, 32), (16, 32)),       # (6 against 3 tiles)
])
def test_backward_kv_tile(q_tile, kv_tile, want):
    axes = GNAConfig((5, 5)).resolve((48, 96)) if len(q_tile) == 2 else (
        GNAConfig((5,) * len(q_tile)).resolve((48,) * len(q_tile)))
    assert jax_gna.geometry.backward_kv_tile(axes, q_tile, kv_tile) == want


@pytest.mark.parametrize("shape, window, stride, kernels, want", [
    # FLUX-4K NA: 16x8 CTAs visit 5 % fewer pairs than the forward's 8x16 on the sm90a
    # kernels; the sm80 family runs the forward's 8x8 KV tiles in 64-row CTAs, cheaper still.
    ((256, 256), (80, 80), (1, 1), "sm90a", ((8, 16), (16, 4))),
    ((256, 256), (80, 80), (1, 1), "sm80", ((8, 16), (8, 8))),
    ((16, 32, 32), (7, 7, 7), (1, 1, 1), "sm90a", ((16, 2, 4), (8, 2, 4))),
    ((16, 32, 32), (7, 7, 7), (1, 1, 1), "sm80", ((4, 8, 4), (4, 4, 4))),
    ((16, 64, 64), (13, 13, 13), (1, 1, 1), "sm90a", ((16, 2, 4), (16, 4, 1))),
    ((16, 64, 64), (13, 13, 13), (1, 1, 1), "sm80", ((16, 2, 4), (16, 4, 1))),
    # Issue 8's other problems keep the forward's tiles.
    ((256, 256), (80, 80), (16, 16), "sm90a", ((8, 16), (8, 8))),
    ((30, 48, 80), (18, 24, 24), (1, 1, 1), "sm90a", ((8, 4, 4), (2, 8, 4))),
    ((30, 48, 80), (18, 24, 24), (1, 1, 1), "sm80", ((8, 4, 4), (2, 8, 4))),
    ((30, 48, 80), (18, 24, 24), (16, 8, 8), "sm90a", ((2, 8, 8), (2, 4, 8))),
    ((32768,), (2048,), (256,), "sm80", ((128,), (64,))),
])
def test_backward_tiles_of_known_problems(shape, window, stride, kernels, want):
    axes = GNAConfig(window, stride).resolve(shape)
    g = jax_gna.geometry
    assert g.backward_tile_shapes(axes, kernels=kernels) == want
    forward = g.default_tile_shapes(axes)
    assert g.backward_tile_shapes(axes, deterministic=True, kernels=kernels) == forward
    assert g.backward_tile_shapes(axes, arch="xla") == g.default_tile_shapes(axes, arch="xla")


@pytest.mark.parametrize("sizes", [((6, 40), (12, 64)), ((4, 18), (6, 24), (6, 24))])
def test_backward_tiles_are_the_least_cost_by_brute_force(sizes):
    """The backward's pick against the pairs of its CTAs counted on the dense mask: Q tiles
    and doubled KV tiles (sm90a; sm80 where it takes 128-row CTAs), or 64-row CTA pairs at
    their weight. It leaves the forward's tiles only for a cost at least 5 % lower."""
    rng = np.random.default_rng()
    g = jax_gna.geometry
    moved = {kernels: 0 for kernels in g.BACKWARD_KERNELS}
    for trial in range(16):  # the sm90a pick leaves the forward's tiles in ~40-60 % of draws
        shape = tuple(int(rng.integers(lo, hi)) for lo, hi in sizes)
        window = tuple(int(rng.integers(2, n + 1)) for n in shape)
        cfg = GNAConfig(window, tuple(int(rng.integers(1, min(k, 3) + 1)) for k in window))
        axes = cfg.resolve(shape)
        forward = g.default_tile_shapes(axes)
        extras = [(g.fit_tile(q, axes), g.fit_tile(kv, axes))
                  for q, kv in g._BACKWARD_EXTRA_TILES["sm80"][len(shape)]]
        candidates = list(dict.fromkeys([forward, *g.tile_menu(axes), *extras]))
        for kernels in g.BACKWARD_KERNELS:
            costs = []
            for q, kv in candidates:
                if kernels == "sm90a" or g.backward_kv_rows(axes, q, kv) == 128:
                    box, weight = g.backward_kv_tile(axes, q, kv), 1.0
                else:
                    box, weight = kv, g._SM80_64_ROW_PAIR_COST
                costs.append(weight * brute_force(shape, cfg, q, box)["visited_tiles"])
            best = costs.index(min(costs))
            want = candidates[best] if costs[best] <= 0.95 * costs[0] else forward
            chosen = g.backward_tile_shapes(axes, kernels=kernels)
            assert chosen == want, (trial, kernels, shape, cfg, candidates, costs)
            moved[kernels] += chosen != forward
    assert moved["sm90a"] >= 1, moved


@pytest.mark.parametrize("fn", [
    lambda axes: jax_gna.geometry.tile_menu(axes, arch="sm70"),
    lambda axes: jax_gna.geometry.default_tile_shapes(axes, arch="sm70"),
    lambda axes: jax_gna.geometry.tile_cost(axes, (8, 16), (8, 8), arch="sm70"),
    lambda axes: jax_gna.geometry.backward_tile_shapes(axes, arch="sm70"),
])
def test_unknown_arch_is_rejected(fn):
    axes = GNAConfig((7, 7)).resolve((64, 64))
    with pytest.raises(ValueError, match="arch='sm70' has no tile menu"):
        fn(axes)


def test_unknown_backward_kernels_are_rejected():
    axes = GNAConfig((7, 7)).resolve((64, 64))
    for fn in (jax_gna.geometry.backward_tile_cost, jax_gna.geometry.backward_tile_shapes):
        with pytest.raises(ValueError, match="kernels='sm70' must be one of"):
            fn(axes, *([(8, 16), (8, 8)] if fn is jax_gna.geometry.backward_tile_cost else []),
               kernels="sm70")
    # Also where the forward's tiles would be returned without a cost: deterministic, 1-D.
    for axes, deterministic in ((axes, True), (GNAConfig(7).resolve((256,)), False)):
        with pytest.raises(ValueError, match="kernels='sm70' must be one of"):
            jax_gna.geometry.backward_tile_shapes(axes, deterministic=deterministic,
                                                  kernels="sm70")


def test_find_plans_for_the_first_candidate():
    # The neighbourhood problem's own default differs, the plan does not.
    found = jax_gna.find_configs((30, 48, 80), window=(18, 24, 24), top=3)
    assert all(f.result.q_tile_shape == (2, 8, 8) for f in found)
    assert jax_gna.simulate((30, 48, 80), GNAConfig((18, 24, 24))).q_tile_shape == (8, 4, 4)


def test_3d_is_fast():
    cfg = GNAConfig((18, 24, 24), (1, 1, 1))
    jax_gna.simulate((30, 48, 80), cfg)  # warm caches of the import machinery
    start = time.perf_counter()
    r = jax_gna.simulate((30, 48, 80), GNAConfig((18, 24, 24), (16, 8, 8), 1, False),
                         q_tile_shape=(2, 8, 8), kv_tile_shape=(2, 4, 8))
    r2 = jax_gna.simulate((30, 48, 80), cfg, q_tile_shape=(3, 8, 8), kv_tile_shape=(2, 8, 4))
    assert time.perf_counter() - start < 0.5
    assert r.block_sparse and r.tile_speedup == pytest.approx(r.flop_speedup)
    assert not r2.block_sparse


# ----------------------------------------------------------------------------------------
# Brute force sweep.
# ----------------------------------------------------------------------------------------

def test_simulator_matches_brute_force_on_random_problems():
    rng = np.random.default_rng(1234)
    n_sparse = n_dense = 0
    for trial in range(600):
        shape, cfg, tq, tk = (_block_problem(rng) if trial % 6 == 0 else _random_problem(rng))
        r = jax_gna.simulate(shape, cfg, q_tile_shape=tq, kv_tile_shape=tk)
        bf = brute_force(shape, cfg, tq, tk)
        where = f"trial {trial}: {shape} {cfg} q_tile={tq} kv_tile={tk}"
        for name in ("neighborhood_size", "visited_tiles", "full_tiles", "masked_tiles",
                     "block_sparse", "dense_tile_pairs"):
            assert getattr(r, name) == bf[name], f"{name}: {where}"
        assert r.partial_tiles == bf["visited_tiles"] - bf["full_tiles"], where
        assert r.flop_speedup == pytest.approx(bf["flop_speedup"], rel=1e-12), where
        assert r.tile_speedup == pytest.approx(bf["dense_tile_pairs"] / bf["visited_tiles"],
                                               rel=1e-12), where
        n_sparse += r.block_sparse
        n_dense += not r.block_sparse
    # The sweep must exercise both outcomes substantially.
    assert n_sparse >= 100 and n_dense >= 100, (n_sparse, n_dense)


def test_block_sparse_without_padding_means_equal_speedups():
    rng = np.random.default_rng(7)
    for _ in range(100):
        shape, cfg, tq, tk = _block_problem(rng)
        r = jax_gna.simulate(shape, cfg, q_tile_shape=tq, kv_tile_shape=tk)
        assert r.block_sparse
        assert r.tile_speedup == pytest.approx(r.flop_speedup, rel=1e-12)


def test_padding_alone_is_not_masking():
    # 10 keys, window 10 = whole axis, KV tile 4: the last KV tile is half padding.
    r = jax_gna.simulate((10,), GNAConfig(10), q_tile_shape=(5,), kv_tile_shape=(4,))
    assert r.block_sparse and r.masked_tiles == 0
    assert r.partial_tiles == 2  # both Q tiles x the padded KV tile
    assert r.full_tiles == 4


def test_token_map_matches_brute_force():
    rng = np.random.default_rng(99)
    for _ in range(60):
        shape, cfg, tq, tk = _random_problem(rng)
        query = tuple(int(rng.integers(0, n)) for n in shape)
        m = simulator.token_map(shape, cfg, query, q_tile_shape=tq, kv_tile_shape=tk)
        bf = brute_force(shape, cfg, tq, tk)
        flat_q = np.ravel_multi_index(query, shape)
        qt = bf["aq"][:, flat_q].argmax()
        kv_of_token = bf["ak"].argmax(axis=0)
        visited = bf["seen"][qt] > 0
        full = (bf["seen"][qt] == bf["size"][qt]) & (bf["ak"].sum(1) == math.prod(tk))
        mask = jax_gna.neighborhood_mask(shape, cfg)
        where = f"{shape} {cfg} {tq} {tk} query={query}"
        np.testing.assert_array_equal(m["neighborhood"].ravel(), mask[flat_q], where)
        np.testing.assert_array_equal(m["q_tile"].ravel(), bf["aq"][qt] > 0, where)
        np.testing.assert_array_equal(m["visited"].ravel(), visited[kv_of_token], where)
        np.testing.assert_array_equal(m["full"].ravel(), (visited & full)[kv_of_token], where)


# ----------------------------------------------------------------------------------------
# Configuration finder.
# ----------------------------------------------------------------------------------------

def test_find_configs_results_are_block_sparse_by_brute_force():
    shape, q_tile, kv_tile = (12, 24), (2, 4), (2, 2)
    found = jax_gna.find_configs(shape, window=(6, 9), q_tile_shape=q_tile,
                                 kv_tile_shape=kv_tile, top=15)
    assert len(found) == 15
    distances = [f.distance for f in found]
    assert distances == sorted(distances)
    for f in found:
        bf = brute_force(shape, f.config, q_tile, kv_tile)
        assert bf["block_sparse"], f.config
        assert f.result.block_sparse
        assert f.result.tile_speedup == pytest.approx(bf["flop_speedup"], rel=1e-12)


@pytest.mark.parametrize("length,dilation,causal,tq,tk,any_sparse", [
    (24, 1, False, 4, 2, True), (30, 1, False, 3, 2, True), (23, 2, False, 2, 1, True),
    (27, 3, False, 2, 2, True), (26, 2, False, 2, 2, True), (17, 1, True, 1, 1, True),
    # A causal window ends at the query: a Q tile of several queries always masks keys.
    (20, 1, True, 2, 1, False), (25, 2, False, 2, 2, False)])
def test_find_configs_is_exhaustive_on_one_axis(length, dilation, causal, tq, tk, any_sparse):
    """Every block-sparse (k, s) of a short axis, by brute force, is found, and only those."""
    want = set()
    for k in range(2, length // dilation + 1):
        for s in range(1, k + 1):
            cfg = GNAConfig(k, s, dilation, causal)
            if brute_force((length,), cfg, (tq,), (tk,))["block_sparse"]:
                want.add((k, s))
    found = jax_gna.find_configs((length,), stride=1, dilation=dilation, is_causal=causal,
                                 q_tile_shape=(tq,), kv_tile_shape=(tk,), top=10_000)
    assert {(f.window[0], f.stride[0]) for f in found} == want
    assert bool(want) == any_sparse


def test_find_30_48_80_is_fast_and_exact():
    start = time.perf_counter()
    found = jax_gna.find_configs((30, 48, 80), window=(18, 24, 24))
    assert time.perf_counter() - start < 10.0
    assert found and found[0].window == (18, 24, 24) and found[0].distance == 0.0
    for f in found:
        assert f.result.block_sparse
        assert f.result.tile_speedup == pytest.approx(f.result.flop_speedup, rel=1e-12)
        again = jax_gna.simulate((30, 48, 80), f.config)
        assert again == f.result


def test_find_configs_target_sparsity():
    found = jax_gna.find_configs((32, 64), target_sparsity=0.9, q_tile_shape=(4, 8),
                                 kv_tile_shape=(4, 4), top=5)
    assert found
    for f in found:
        assert f.result.block_sparse
    assert abs(found[0].result.sparsity - 0.9) <= abs(found[-1].result.sparsity - 0.9) + 1e-12


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "window, stride or target_sparsity"),
    (dict(window=(4, 4, 4)), "one entry per spatial axis"),
    (dict(window=1), "window"),
    (dict(window=40), "window"),
    (dict(target_sparsity=1.5), "target_sparsity"),
    (dict(window=4, top=0), "top"),
    (dict(window=4, q_tile_shape=(0, 2)), "q_tile_shape"),
    (dict(window=4, dilation=20), "dilation"),
])
def test_find_configs_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jax_gna.find_configs((16, 16), **kwargs)


def test_simulate_bad_input():
    with pytest.raises(TypeError, match="cfg"):
        jax_gna.simulate((8, 8), (3, 3))
    with pytest.raises(ValueError, match="stride"):
        jax_gna.simulate((8, 8), GNAConfig(3, 4))
    with pytest.raises(ValueError, match="kv_tile_shape"):
        jax_gna.simulate((8, 8), GNAConfig(3), kv_tile_shape=(4,))
    with pytest.raises(ValueError, match="arch"):
        jax_gna.simulate((8, 8), GNAConfig(3), arch="sm10")


# ----------------------------------------------------------------------------------------
# The xla implementation visits exactly what the simulator counts.
# ----------------------------------------------------------------------------------------

def test_xla_visit_lists_match_simulator():
    """Counts the valid entries of the `xla` path's own visit lists (forward and backward).

    The `xla` path processes all dilation groups of an axis together, padded to
    ``ceil(L / d)`` (`geometry.padded_group_tiling`): when ``d`` divides every ``L`` this is
    exact and its counts must equal the simulator's; otherwise it may only visit more.
    """
    from jax_gna import xla
    rng = np.random.default_rng(5)
    checked_exact = 0
    for trial in range(150):
        shape, cfg, tq, tk = _random_problem(rng)
        axes = cfg.resolve(shape)
        plan = xla.make_plan(axes, 1.0, 32, tq, tk)
        visits = xla._visits(plan)
        groups = math.prod(a.dilation for a in axes)
        n_full = groups * int(visits["full"].valid.sum())
        n_visited = n_full + groups * int(visits["partial"].valid.sum())
        n_visited_t = groups * int(visits["full_t"].valid.sum() + visits["partial_t"].valid.sum())
        r = jax_gna.simulate(shape, cfg, q_tile_shape=tq, kv_tile_shape=tk)
        where = f"trial {trial}: {shape} {cfg} {tq} {tk}"
        assert n_visited_t == n_visited, where
        if all(a.length % a.dilation == 0 for a in axes):
            checked_exact += 1
            assert n_visited == r.visited_tiles, where
            assert n_full == r.full_tiles, where
        else:
            assert n_visited >= r.visited_tiles, where
    assert checked_exact >= 100
