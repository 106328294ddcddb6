"""``fisher run`` end to end with a tiny preset file: every step, the report, and a rerun that reuses them.

The preset is the shape of ``mnist-small`` at toy scale (64 images per split, a 1-layer prior, a
one-cell sweep, one-epoch decoders); FID runs the real Inception weights on 4 pairs × 1 α against
8 real images, so the test is skipped without the weights file.
"""
from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA

from raycluster import cli

WEIGHTS = SHARED_DATA / "pt_inception-2015-12-05-nofc.pth"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not WEIGHTS.exists(), reason=f"{WEIGHTS} absent (set FISHER_SHARED_DATA)")]

STEPS = ["prepare", "train-prior", "sweep", "embed-activation", "decoder-fisher", "interpolate-fisher", "fid-fisher",
         "decoder-activation", "interpolate-activation", "fid-activation"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist_dir):
    import ray
    root = tmp_path_factory.mktemp("run")
    grid = root / "grid.json"
    grid.write_text(json.dumps({"density": [1.0], "dim": [16]}))
    preset = {
        "description": "toy", "dataset": "mnist",
        "prepare": {"limit": 64, "seed": 0},
        "prior": {"layers": 1, "filters": 4, "epochs": 1, "batch_size": 32, "cpus_per_worker": 0.5},
        "embed": {"dim": 16, "density": 1.0, "seed": 0, "actors": 1},
        "decoder": {"decoder": "conv", "epochs": 1, "batch_size": 32, "cpus_per_worker": 0.5},
        "interpolate": {"pairs": 2},
        "evaluate": {"pairs": 4, "real_limit": 8, "alphas": [0.0], "batch_size": 4},
        "sweep": {"grid": str(grid), "epochs": 1, "batch_size": 32, "cpus_per_trial": 0.5},
    }
    (root / "toy.json").write_text(json.dumps(preset))
    argv = ["run", "--preset", str(root / "toy.json"), "--data", str(mnist_dir), "--out", str(root / "out"),
            "--fid-weights", str(WEIGHTS)]
    assert cli.main(argv) == 0
    yield root, argv
    ray.shutdown()


def test_every_step_and_the_report(run):
    root, _ = run
    out = root / "out"
    assert list(json.loads((out / "timings.json").read_text())) == STEPS
    # the Fisher embedding is the sweep's cell (dim 16, density 1): no second gradient pass
    assert not (out / "emb-fisher").exists()
    assert json.loads((out / "decoder-fisher" / "manifest.json").read_text())["config"]["column"] == "z"
    report = (out / "report.md").read_text()
    for heading in ("## Prior", "## Reconstruction grid (paper Figure 3a)", "## Decoders (test split)",
                    "## Interpolation FID (paper Algorithm 1, Figure 3b)", "## How this run compares with the paper",
                    "## Timings (seconds, this run)"):
        assert heading in report, heading
    assert "| fisher | `z` |" in report and "| activation | `z` |" in report
    assert "the train split's mean image" in report
    for kind in ("fisher", "activation"):
        fid = json.loads((out / f"fid-{kind}" / "fid.json").read_text())
        assert fid["pairs"] == 4 and list(fid["fid"]) == ["0"] and fid["fid"]["0"] > 0
        assert f"![{kind}](interpolate-{kind}/interpolations.png)" in report
        assert (out / f"interpolate-{kind}" / "interpolations.png").exists()
    assert json.loads((out / "preset.json").read_text())["prior"]["layers"] == 1


def test_rerun_reuses_every_step(run, capsys):
    root, argv = run
    report = (root / "out" / "report.md").read_bytes()
    capsys.readouterr()
    assert cli.main(argv) == 0
    said = capsys.readouterr().out
    assert all(f"[run] {step}: done before, reused" in said for step in STEPS), said
    assert (root / "out" / "report.md").read_bytes() == report
