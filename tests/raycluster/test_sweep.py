"""``fisher sweep`` (paper Figure 3a grid with Ray Tune) on a tiny real-MNIST pipeline.

One local Ray instance serves the module: prepare (96 images per split) →
a 1-layer prior → a 2 × 2 grid (density 0.01, 1 × dim 8, 16), one decoder
epoch per cell. Checks the cell records, the grid table and plot, resuming
after an interruption (only missing cells are trained) and the refusals.
"""
from __future__ import annotations

import json
import math
import re

import pytest

from raycluster import cli

GRID = {"density": [0.01, 1.0], "dim": [8, 16]}
COLUMNS = ["z_d8_p0.01", "z_d8_p1", "z_d16_p0.01", "z_d16_p1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist_dir):
    import ray
    root = tmp_path_factory.mktemp("sweep")
    assert cli.main(["prepare", "mnist", "--src", str(mnist_dir), "--out", str(root / "data"),
                     "--limit", "96", "--shard-size", "48"]) == 0
    assert cli.main(["train-prior", "--data", str(root / "data"), "--out", str(root / "prior"), "--epochs", "1",
                     "--layers", "1", "--filters", "4", "--batch-size", "32"]) == 0
    (root / "grid.json").write_text(json.dumps(GRID))
    assert _sweep(root) == 0
    yield root
    ray.shutdown()


def _sweep(root, *extra, epochs="1"):
    return cli.main(["sweep", "--prior", str(root / "prior"), "--data", str(root / "data"), "--out", str(root / "out"),
                     "--grid", str(root / "grid.json"), "--epochs", epochs, "--batch-size", "32", *extra])


def _table(md: str, title: str) -> dict[tuple[str, str], float]:
    """{(dim, density): value} of the markdown table under ``## title``."""
    section = md.split(f"## {title}", 1)[1].split("##", 1)[0]
    rows = [r for r in section.strip().splitlines() if r.startswith("|")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    assert head[0] == "dim \\ density"
    out = {}
    for r in rows[2:]:
        cells = [c.strip() for c in r.strip("|").split("|")]
        out.update({(cells[0], d): float(v) for d, v in zip(head[1:], cells[1:])})
    return out


def test_cells_table_plot_manifest(run):
    out = run / "out"
    assert sorted(p.stem for p in (out / "cells").glob("*.json")) == sorted(COLUMNS)
    rec = json.loads((out / "cells" / "z_d16_p1.json").read_text())
    assert rec["dim"] == 16 and rec["density"] == 1.0 and rec["epochs"] == 1
    assert rec["n_train"] == 96 and rec["n_test"] == 96 and len(rec["history"]) == 1
    assert math.isfinite(rec["test_bce_nats_per_pixel"]) and math.isfinite(rec["test_mse"])

    md = (out / "grid.md").read_text()
    for title in ("Test BCE (nats per pixel)", "Test MSE"):
        table = _table(md, title)
        assert sorted(table) == sorted((dim, dens) for dim in ("8", "16") for dens in ("0.01", "1"))
        assert all(math.isfinite(v) and v > 0 for v in table.values())
    bce = _table(md, "Test BCE (nats per pixel)")
    assert bce[("16", "1")] == pytest.approx(rec["test_bce_nats_per_pixel"], abs=1e-4)
    # rows are dimensions in grid order (8 then 16), columns densities (0.01 then 1)
    assert re.search(r"^\| 8 \|.*\n\| 16 \|", md, re.MULTILINE)

    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "sweep" and manifest["config"]["grid"] == GRID
    assert set(manifest["inputs"]) == {"prior", "data", "embeddings"}
    assert sorted(c["column"] for c in manifest["cells"]) == sorted(COLUMNS)
    # one gradient pass: a single embedding directory holds every cell's column
    emb = json.loads((out / "embeddings" / "manifest.json").read_text())
    assert set(COLUMNS) <= set(emb["columns"])
    assert (out / "tune" / "sweep").is_dir()      # the Ray Tune experiment


def test_resume_trains_only_missing_cells(run, capsys):
    cells = run / "out" / "cells"
    removed, kept = COLUMNS[1:3], [COLUMNS[0], COLUMNS[3]]
    for c in removed:
        (cells / f"{c}.json").unlink()
    before = {c: ((cells / f"{c}.json").stat().st_mtime_ns, (cells / f"{c}.json").read_bytes()) for c in kept}
    capsys.readouterr()
    assert _sweep(run, "--resume") == 0
    printed = capsys.readouterr().out
    assert "2 of 4 cells already done" in printed
    assert {c: ((cells / f"{c}.json").stat().st_mtime_ns, (cells / f"{c}.json").read_bytes()) for c in kept} == before
    assert sorted(p.stem for p in cells.glob("*.json")) == sorted(COLUMNS)
    table = _table((run / "out" / "grid.md").read_text(), "Test BCE (nats per pixel)")
    assert len(table) == 4 and all(math.isfinite(v) for v in table.values())
    # a second --resume has nothing to train
    assert _sweep(run, "--resume") == 0
    assert "4 of 4 cells already done" in capsys.readouterr().out


def test_changed_config_is_refused(run, capsys):
    capsys.readouterr()
    for extra in ((), ("--resume",)):
        assert _sweep(run, *extra, epochs="2") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fisher sweep: error:")
        assert "decoder.epochs: 1 there, 2 now" in err[0] and "new --out" in err[0]


def test_bad_grid_and_inputs_are_one_line_errors(run, tmp_path, capsys):
    base = ["sweep", "--prior", str(run / "prior"), "--data", str(run / "data"), "--out", str(tmp_path / "o")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"density": [2.0], "dim": [8]}))
    cases = [(["--grid", "no_such_grid"], "no search space 'no_such_grid'"),
             (["--grid", str(bad)], "density 2.0"),
             (["--prior", str(tmp_path / "missing")], "no manifest.json")]
    capsys.readouterr()
    for extra, message in cases:
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()
