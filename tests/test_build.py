"""The build: the installed extension describes itself truthfully, the dispatcher offers what
exists, and a CPU-only build (CUDA switched off) compiles, imports and computes.

``JAX_GNA_EXPECT_CUDA=1`` (or ``0``), set by .ci/run, makes the first test also assert
whether the installed extension was built with CUDA, so that CI notices a build that
silently lost its CUDA part.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import jax_gna
from jax_gna import native

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    native.extension_unavailable() is not None,
    reason=f"the native extension is not built: {native.extension_unavailable()}")


def test_extension_reports_its_build():
    ext = native._ext
    has_cuda = ext.has_cuda()
    assert isinstance(has_cuda, bool)
    assert sorted(ext.handlers("cpu")) == ["jax_gna_cpu_backward", "jax_gna_cpu_forward"]
    cuda = sorted(ext.handlers("cuda"))
    assert cuda == (["jax_gna_cuda_backward", "jax_gna_cuda_forward"] if has_cuda else [])
    archs = ext.cuda_sm80_archs()
    assert (archs != "") == has_cuda
    assert all(a.isdigit() for a in archs.split(",") if a), archs
    # CUDA builds carry the sm90a forward, enabled for compute capability 9.0 only.
    assert not ext.cuda_sm90_enabled(80)
    if os.environ.get("JAX_GNA_CUDA_KERNELS") != "sm80":
        assert ext.cuda_sm90_enabled(90) == has_cuda
    expect = os.environ.get("JAX_GNA_EXPECT_CUDA")
    if expect is not None:
        assert has_cuda == (expect == "1"), f"JAX_GNA_EXPECT_CUDA={expect}, has_cuda={has_cuda}"
    with pytest.raises(ValueError, match="platform"):
        ext.handlers("tpu")


def test_dispatcher_offers_what_exists():
    available = jax_gna.available_implementations()
    # The CPU handler serves JAX's CPU backend only (a GPU default device rules it out).
    assert ("cpu" in available) == (native.cpu_unavailable() is None)
    if jax.default_backend() == "cpu":
        assert "cpu" in available
    assert ("cuda" in available) == (native.cuda_unavailable() is None)
    if not native.has_cuda():
        assert "built without CUDA" in native.cuda_unavailable()
    elif jax.default_backend() != "gpu":
        assert "default backend" in native.cuda_unavailable()
    if "cuda" not in available:
        q = jnp.ones((1, 8, 2, 4), jnp.bfloat16)
        with pytest.raises(ValueError, match="implementation='cuda' is not available"):
            jax_gna.attention(q, q, q, jax_gna.GNAConfig(3), implementation="cuda")


def _tool(name: str) -> str:
    """A build tool from this interpreter's environment (the `test` extra installs them)."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    found = local if os.path.exists(local) else shutil.which(name)
    assert found, f"{name} not found: install the package with its `test` extra"
    return found


def test_cpu_only_build_compiles_imports_and_computes(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ, JAX_GNA_CUDA="0")
    configure = [_tool("cmake"), "-S", _ROOT, "-B", str(build), "-G", "Ninja",
                 f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}",
                 f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"]
    logs = []
    for cmd in (configure, [_tool("cmake"), "--build", str(build)]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, f"{cmd[:2]} failed:\n{proc.stdout[-4000:]}\n{proc.stderr}"
        logs.append(proc.stdout)
    # The switch keeps CMake away from CUDA altogether, even where nvcc exists.
    assert "JAX_GNA_CUDA is off" in logs[0]
    assert "CUDA compiler identification" not in logs[0]
    assert ".cu.o" not in logs[1]
    script = textwrap.dedent(f"""
        import sys
        # jax first, as jax_gna does: on a machine whose compiler links libstdc++
        # statically, loading the extension before numpy/ml_dtypes crashes ml_dtypes.
        import numpy as np, jax, jax.numpy as jnp
        sys.path.insert(0, {str(build)!r})
        import _jax_gna_native
        assert _jax_gna_native.__file__.startswith({str(build)!r}), _jax_gna_native.__file__
        assert _jax_gna_native.has_cuda() is False
        assert _jax_gna_native.handlers("cuda") == {{}}
        import jax_gna
        assert "cpu" in jax_gna.available_implementations()
        assert "cuda" not in jax_gna.available_implementations()
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((2, 9, 7, h, 8)), jnp.float32)
                   for h in (4, 2, 2))
        cfg = jax_gna.GNAConfig((3, 4), (1, 2), (2, 1), (False, True))
        got = jax_gna.attention(q, k, v, cfg, implementation="cpu", return_lse=True)
        want = jax_gna.attention(q, k, v, cfg, implementation="reference", return_lse=True)
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)
        print("cpu-only build OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=_ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "cpu-only build OK" in proc.stdout

