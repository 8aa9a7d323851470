"""``python -m jax_gna``: every subcommand runs on CPU and says what the library computes."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

import jax_gna
from jax_gna import cli
from jax_gna.config import GNAConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "check", "bench", "sim", "find", "draw"):
        assert f"python -m jax_gna {command}" in out


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "jax_gna", "sim", "32", "--window", "8",
                           "--stride", "8", "--q-tile", "8", "--kv-tile", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "block-sparse      yes" in proc.stdout


def test_sim_prints_the_simulation(capsys):
    code, out, _ = run_cli(capsys, "sim", "256", "256", "--window", "80", "--stride", "16",
                           "--q-tile", "16", "16", "--kv-tile", "16", "8")
    assert code == 0
    assert "FLOP-wise speedup 10.240x" in out and "tile speedup      10.240x" in out
    assert "block-sparse      yes" in out


def test_sim_lists_the_3d_tile_menu(capsys):
    code, out, _ = run_cli(capsys, "sim", "30", "48", "80", "--window", "18", "24", "24")
    assert code == 0
    menu = [line for line in out.splitlines() if line.startswith("  Q ")]
    assert len(menu) == 3
    cfg = GNAConfig((18, 24, 24))
    for line in menu:
        q = tuple(int(x) for x in line.split("Q (")[1].split(")")[0].split(","))
        kv = tuple(int(x) for x in line.split("KV (")[1].split(")")[0].split(","))
        r = jax_gna.simulate((30, 48, 80), cfg, q_tile_shape=q, kv_tile_shape=kv)
        assert f"{r.visited_tiles} pairs" in line
    default = jax_gna.simulate((30, 48, 80), cfg)
    marked = [line for line in menu if line.endswith("<- default")]
    assert marked == [f"  Q {default.q_tile_shape}  KV {default.kv_tile_shape}  "
                      f"{default.visited_tiles} pairs  <- default"]
    # KV 4x4x4 does not divide 30 frames: its rows are gathered.
    assert [line for line in menu if "gathered" in line] == [
        line for line in menu if "KV (4, 4, 4)" in line]


def test_sim_lists_the_2d_tile_menu(capsys):
    # Window 21 on 72x72: KV 4x16 visits fewer pairs but does not divide 72, so the first
    # candidate stays the default.
    code, out, _ = run_cli(capsys, "sim", "72", "72", "--window", "21")
    assert code == 0
    menu = [line for line in out.splitlines() if line.startswith("  Q ")]
    assert len(menu) == 3
    assert menu[0].startswith("  Q (8, 16)  KV (8, 8)") and menu[0].endswith("<- default")
    assert "(KV rows gathered)" in menu[1] and "(KV rows gathered)" not in menu[0]
    # 1-D has one candidate, and explicit tiles print no menu.
    for argv in (("sim", "32768", "--window", "2048"),
                 ("sim", "30", "48", "80", "--window", "18", "--q-tile", "2", "8", "8",
                  "--kv-tile", "2", "4", "8")):
        code, out, _ = run_cli(capsys, *argv)
        assert code == 0 and "tile menu" not in out


def test_sim_prints_the_backward_tiles(capsys):
    # FLUX-4K NA: the sm90a backward takes KV 16x4 tiles (16x8 CTAs), the sm80 one the
    # forward's.
    code, out, _ = run_cli(capsys, "sim", "256", "256", "--window", "80")
    assert code == 0
    axes = GNAConfig((80, 80)).resolve((256, 256))
    g = jax_gna.geometry
    lines = out.splitlines()
    at = lines.index(f"backward tiles    sm90a: Q (8, 16)  KV (16, 4) (cost "
                     f"{g.backward_tile_cost(axes, (8, 16), (16, 4)):.0f}, the forward's "
                     f"{g.backward_tile_cost(axes, (8, 16), (8, 8)):.0f})")
    cost = g.backward_tile_cost(axes, (8, 16), (8, 8), kernels="sm80")
    assert lines[at + 1] == f"                  sm80:  the forward's (cost {cost:.0f})"
    # Hunyuan GNA keeps the forward's tiles; the xla path prints none.
    code, out, _ = run_cli(capsys, "sim", "30", "48", "80", "--window", "18", "24", "24",
                           "--stride", "16", "8", "8")
    assert code == 0 and "backward tiles    sm90a: the forward's (cost 72900)" in out
    code, out, _ = run_cli(capsys, "sim", "256", "256", "--window", "80", "--arch", "xla")
    assert code == 0 and "backward tiles" not in out


def test_sim_json_equals_simulate(capsys):
    code, out, _ = run_cli(capsys, "sim", "9", "20", "--window", "5", "7", "--stride", "2",
                           "--dilation", "1", "2", "--causal", "1", "0", "--json")
    assert code == 0
    want = jax_gna.simulate((9, 20), GNAConfig((5, 7), 2, (1, 2), (True, False)))
    got = json.loads(out)
    assert got["visited_tiles"] == want.visited_tiles
    assert got["tile_speedup"] == pytest.approx(want.tile_speedup)
    assert got["block_sparse"] == want.block_sparse


def test_find_30_48_80(capsys):
    start = time.perf_counter()
    code, out, _ = run_cli(capsys, "find", "30", "48", "80", "--window", "18", "24", "24")
    assert time.perf_counter() - start < 10.0
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("(") and "x " in line]
    assert len(rows) == 10
    for row in rows:
        window, stride = (tuple(int(x) for x in part.strip("() ").split(","))
                          for part in row.split(")")[:2])
        bound, tile = (float(x.rstrip("x")) for x in row.split()[-3:-1])
        assert bound == tile  # speedup equals the FLOP-wise bound
        r = jax_gna.simulate((30, 48, 80), GNAConfig(window, stride))
        assert r.block_sparse and r.tile_speedup == pytest.approx(tile, abs=1e-3)


def test_find_reports_when_nothing_is_block_sparse(capsys):
    code, out, _ = run_cli(capsys, "find", "20", "--window", "6", "--causal", "1",
                           "--q-tile", "4", "--kv-tile", "4")
    assert code == 1 and "no perfectly block-sparse" in out


def _colour_pixels(img, rgb):
    return int(np.sum(np.all(np.abs(img[..., :3] - np.asarray(rgb)) < 1.5 / 255, axis=-1)))


def _colour_present(img, rgb):
    """More pixels of `rgb` than its legend patch has: the map itself shows that colour."""
    return _colour_pixels(img, rgb) > 1000


def _read_png(path):
    import matplotlib.image
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) < 200_000
    return matplotlib.image.imread(str(path))


def test_draw_2d_shows_partial_tiles_for_na(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out_path = tmp_path / "na.png"
    code, out, _ = run_cli(capsys, "draw", "32", "32", "--window", "7", "--query", "10", "12",
                           "--out", str(out_path))
    assert code == 0 and str(out_path) in out
    img = _read_png(out_path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    # Neighbourhood attention with 8x16 / 8x8 tiles: only partial tiles.
    assert _colour_present(img, cli.COLORS["partial_seen"])
    assert _colour_present(img, cli.COLORS["partial_masked"])
    assert not _colour_present(img, cli.COLORS["full"])


def test_draw_3d_slice_of_block_sparse_config(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out_path = tmp_path / "gna.png"
    code, _, _ = run_cli(capsys, "draw", "8", "16", "16", "--window", "4", "8", "8",
                         "--stride", "4", "8", "8", "--q-tile", "2", "8", "8", "--kv-tile",
                         "2", "4", "8", "--query", "3", "5", "9", "--out", str(out_path))
    assert code == 0
    img = _read_png(out_path)
    assert _colour_present(img, cli.COLORS["full"])
    assert not _colour_present(img, cli.COLORS["partial_seen"])
    assert not _colour_present(img, cli.COLORS["partial_masked"])


def test_draw_rejects_1d(capsys, tmp_path):
    code, _, err = run_cli(capsys, "draw", "32", "--window", "4", "--out",
                           str(tmp_path / "x.png"))
    assert code == 2 and "2-D or 3-D" in err


def test_bad_config_names_the_parameter(capsys):
    code, _, err = run_cli(capsys, "sim", "16", "16", "--window", "4", "--stride", "1", "5")
    assert code == 2 and "stride[1]=5 must be <= kernel_size[1]=4" in err


def test_bench_tiny_problem_writes_json(capsys, tmp_path):
    path = tmp_path / "bench.json"
    code, out, err = run_cli(capsys, "bench", "--shape", "8", "8", "--window", "4",
                             "--stride", "2", "--heads", "1", "--head-dim", "8", "--dtype",
                             "float32", "--impl", "xla", "--mode", "fwd", "--reps", "1",
                             "--min-time", "0", "--json", str(path))
    assert code == 0, err
    assert "1/2" in err and "done" in err  # the progress bar
    data = json.loads(path.read_text())
    rows = {r["contestant"]: r for r in data["results"]}
    assert set(rows) >= {"xla", "xla-mask"}
    assert rows["xla"]["ms"] > 0 and rows["xla"]["ratio"] > 0
    assert rows["xla"]["spatial_shape"] == [8, 8]
    assert "xla" in out and "xla-mask" in out


def test_check_one_case(capsys):
    code, out, _ = run_cli(capsys, "check", "--implementation", "xla", "--case", "2d-dil")
    assert code == 0, out
    row = next(line for line in out.splitlines() if line.startswith("xla "))
    errs = [float(x) for x in row.split()[3:8]]
    assert len(errs) == 5 and max(errs) < 1e-4 and row.endswith("ok")


def test_check_unknown_case(capsys):
    code, _, err = run_cli(capsys, "check", "--case", "nope")
    assert code == 2 and "nope" in err


def test_demo(capsys):
    code, out, _ = run_cli(capsys, "demo")
    assert code == 0, out
    assert out.count("OK") == 2 and "all checks passed" in out
    assert "tile speedup" in out
