"""Sharding rules of the native custom calls, on 8 fake CPU devices.

XLA's device count is fixed when JAX starts, so every check runs in a fresh interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the rest of the suite is unaffected).
Each ``_check_*`` function below is that subprocess's body; it raises on failure.

What is checked: batch- and head-sharded calls under `jit` (forward and gradients, also
under `vmap`) equal the unsharded result, keep their sharding, run the custom call on local
shards, and compile without any collective; MQA and spatially sharded inputs are gathered
and still give the right answer; the GSPMD callbacks work when Shardy is switched off.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jax_gna import native

pytestmark = pytest.mark.skipif(
    native.extension_unavailable() is not None,
    reason=f"the native extension is not built: {native.extension_unavailable()}")

_COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce",
                "reduce-scatter")


def _run(check: str) -> None:
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    code = (f"import sys; sys.path.insert(0, {tests!r}); import test_sharding; "
            f"test_sharding.{check}()")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=os.path.dirname(tests),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{check} failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"


def test_batch_and_head_sharded_forward_stays_sharded():
    _run("_check_forward_sharded")


def test_batch_and_head_sharded_gradients_stay_sharded():
    _run("_check_gradients_sharded")


def test_vmapped_call_with_sharded_mapped_axis():
    _run("_check_vmap_sharded")


def test_inputs_that_cannot_stay_sharded_are_gathered_correctly():
    _run("_check_gathered_cases")


def test_gspmd_callbacks():
    _run("_check_gspmd")


# ----------------------------------------------------------------------------------------
# Subprocess bodies (need 8 devices).
# ----------------------------------------------------------------------------------------

def _setup(heads=8, kv_heads=4, batch=4, lead=()):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    import jax_gna

    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    rng = np.random.default_rng(0)
    shape = (*lead, batch, 10, 12)
    q, k, v = (jnp.asarray(rng.standard_normal((*shape, h, 8)), jnp.float32)
               for h in (heads, kv_heads, kv_heads))
    cfg = jax_gna.GNAConfig((5, 3), (2, 1), (1, 2), (False, True))

    def attend(q, k, v):
        return jax_gna.attention(q, k, v, cfg, implementation="cpu", return_lse=True)

    return mesh, (q, k, v), attend


def _loss(attend):
    import jax.numpy as jnp

    def loss(q, k, v):
        out, lse = attend(q, k, v)
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.sin(lse))
    return loss


def _put(mesh, arrays, spec):
    import jax
    from jax.sharding import NamedSharding
    return [jax.device_put(x, NamedSharding(mesh, spec)) for x in arrays]


def _assert_same(actual, expected, atol=0.0):
    import jax
    import numpy as np
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=atol, rtol=atol)


def _assert_no_collectives(fn, *args):
    text = fn.lower(*args).compile().as_text()
    found = [c for c in _COLLECTIVES if c in text]
    assert not found, f"compiled HLO has {found}"
    return text


def _custom_call_shapes(text: str, target: str) -> list[str]:
    return [line.split("=", 1)[1].split("custom-call")[0].strip()
            for line in text.splitlines() if f'custom_call_target="{target}"' in line]


def _check_forward_sharded():
    import jax
    from jax.sharding import PartitionSpec as P

    for heads, kv_heads in ((8, 4), (4, 4)):  # GQA and MHA
        mesh, arrays, attend = _setup(heads=heads, kv_heads=kv_heads)
        fn = jax.jit(attend)
        expected = fn(*arrays)
        spec = P("data", None, None, "model", None)
        sharded = _put(mesh, arrays, spec)
        out, lse = fn(*sharded)
        _assert_same((out, lse), expected)
        assert tuple(out.sharding.spec)[:4] == ("data", None, None, "model"), out.sharding
        assert tuple(lse.sharding.spec)[:4] == ("data", None, None, "model"), lse.sharding
        text = _assert_no_collectives(fn, *sharded)
        # Each device runs the handler on its shard: batch 4/2, heads and kv heads / 4.
        shapes = _custom_call_shapes(text, "jax_gna_cpu_forward")
        local = f"f32[2,10,12,{heads // 4},8]"
        assert shapes and all(local in s for s in shapes), (local, shapes)


def _check_gradients_sharded():
    import jax
    from jax.sharding import PartitionSpec as P

    for heads, kv_heads in ((8, 4), (4, 4)):  # GQA and MHA
        mesh, arrays, attend = _setup(heads=heads, kv_heads=kv_heads)
        grad = jax.jit(jax.grad(_loss(attend), argnums=(0, 1, 2)))
        expected = grad(*arrays)
        spec = P("data", None, None, "model", None)
        sharded = _put(mesh, arrays, spec)
        actual = grad(*sharded)
        _assert_same(actual, expected, atol=1e-6)
        for g in actual:
            assert tuple(g.sharding.spec)[:4] == ("data", None, None, "model"), g.sharding
        text = _assert_no_collectives(grad, *sharded)
        shapes = _custom_call_shapes(text, "jax_gna_cpu_backward")
        assert shapes and all("f32[2,10,12,1,8]" in s for s in shapes), shapes  # local dk


def _check_vmap_sharded():
    import jax
    from jax.sharding import PartitionSpec as P

    mesh, arrays, attend = _setup(batch=1, lead=(4,))
    fn = jax.jit(jax.vmap(attend))
    expected = fn(*arrays)
    sharded = _put(mesh, arrays, P("data", None, None, None, "model", None))
    _assert_same(fn(*sharded), expected)
    _assert_no_collectives(fn, *sharded)
    grad = jax.jit(jax.grad(_loss(jax.vmap(attend)), argnums=(0, 1, 2)))
    _assert_same(grad(*sharded), grad(*arrays), atol=1e-6)
    _assert_no_collectives(grad, *sharded)


def _check_gathered_cases():
    import jax
    from jax.sharding import PartitionSpec as P

    # MQA: one kv head cannot be split four ways, so heads are gathered, the result exact.
    mesh, arrays, attend = _setup(heads=8, kv_heads=1)
    fn = jax.jit(attend)
    grad = jax.jit(jax.grad(_loss(attend), argnums=(0, 1, 2)))
    sharded = (_put(mesh, arrays[:1], P("data", None, None, "model", None))
               + _put(mesh, arrays[1:], P("data")))
    _assert_same(fn(*sharded), fn(*arrays))
    _assert_same(grad(*sharded), grad(*arrays), atol=1e-6)
    # Spatial sharding (window crosses shards): gathered before the call, exact result.
    mesh, arrays, attend = _setup()
    fn = jax.jit(attend)
    grad = jax.jit(jax.grad(_loss(attend), argnums=(0, 1, 2)))
    for spec in (P(None, "data", None, None, None), P(None, None, "model", None, None),
                 P("data", None, "model", None, None)):
        sharded = _put(mesh, arrays, spec)
        _assert_same(fn(*sharded), fn(*arrays))
        _assert_same(grad(*sharded), grad(*arrays), atol=1e-6)


def _check_gspmd():
    import jax
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_use_shardy_partitioner", False)
    mesh, arrays, attend = _setup()
    fn = jax.jit(attend)
    grad = jax.jit(jax.grad(_loss(attend), argnums=(0, 1, 2)))
    sharded = _put(mesh, arrays, P("data", None, None, "model", None))
    _assert_same(fn(*sharded), fn(*arrays))
    _assert_same(grad(*sharded), grad(*arrays), atol=1e-6)
    _assert_no_collectives(fn, *sharded)
    _assert_no_collectives(grad, *sharded)
