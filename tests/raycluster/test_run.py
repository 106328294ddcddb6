"""``fisher run`` end to end with a tiny preset file: every step, the report, and a rerun that reuses them.

The preset is the shape of ``mnist-small`` at toy scale (64 images per split, the builtin prior, a
one-cell sweep, one-epoch decoders, two seeds, Fisher scores and pixels); FID runs the real Inception
weights on 4 pairs × 1 α against 8 real images, so the test is skipped without the weights file.
"""
from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA

from raycluster import cli

WEIGHTS = SHARED_DATA / "pt_inception-2015-12-05-nofc.pth"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not WEIGHTS.exists(), reason=f"{WEIGHTS} absent (set FISHER_SHARED_DATA)")]

STEPS = ["prepare", "baselines", "sweep", "embed-pixel"]
for _kind in ("fisher", "pixel"):
    STEPS += [f"probe-{_kind}"] + ([f"decoder-{_kind}-s0", f"decoder-{_kind}-s1"] if _kind != "pixel" else
                                   ["decoder-pixel"]) + [f"interpolate-{_kind}", f"fid-{_kind}-s0", f"fid-{_kind}-s1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist_dir):
    import ray
    root = tmp_path_factory.mktemp("run")
    grid = root / "grid.json"
    grid.write_text(json.dumps({"density": [1.0], "dim": [16]}))
    preset = {
        "description": "toy", "dataset": "mnist",
        "prepare": {"limit": 64, "seed": 0},
        "prior": {"builtin": "mnist-pixelcnn", "train": False, "layers": 1, "filters": 4, "epochs": 1},
        "embed": {"dim": 16, "density": 1.0, "seed": 0, "actors": 1},
        "decoder": {"decoder": "conv", "epochs": 1, "batch_size": 32, "cpus_per_worker": 0.5},
        "interpolate": {"pairs": 2},
        "evaluate": {"pairs": 4, "real_limit": 8, "alphas": [0.5], "batch_size": 4, "seeds": 2},
        "kinds": ["fisher", "pixel"],       # activations take the same path as pixels (embed, decoder, evaluate)
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
    assert not (out / "emb-fisher").exists() and not (out / "prior").exists()    # the builtin prior: no training
    assert json.loads((out / "decoder-fisher-s0" / "manifest.json").read_text())["config"]["column"] == "z"
    seeds = [json.loads((out / f"decoder-fisher-s{k}" / "manifest.json").read_text())["config"]["seed"] for k in (0, 1)]
    assert seeds == [0, 1]
    report = (out / "report.md").read_text()
    for heading in ("## Prior", "## Reconstruction grid (paper Figure 3a)", "## Decoders (test split)",
                    "## Interpolation FID and KID (paper Algorithm 1, Figure 3b)",
                    "## Semantic probes (beyond the paper)", "## How this run compares with the paper",
                    "## Timings (seconds, this run)"):
        assert heading in report, heading
    assert "| fisher | `z` | conv |" in report and "| activation |" not in report
    pixel_row = next(line for line in report.splitlines() if line.startswith("| pixel | `z` | pixels | – | "))
    assert 0 < float(pixel_row.split("|")[5]) < 0.05       # grey originals vs their binarization: small, not 0
    assert "the train split's mean image" in report and "builtin:mnist-pixelcnn" in report
    baselines = json.loads((out / "baselines" / "baselines.json").read_text())
    assert baselines["prior"]["nll_nats"] < baselines["independent_pixel"]["nll_nats_per_image"] - 50
    for kind in ("fisher", "pixel"):
        fids = [json.loads((out / f"fid-{kind}-s{k}" / "fid.json").read_text()) for k in (0, 1)]
        assert all(f["pairs"] == 4 and list(f["fid"]) == ["0.5"] and f["fid"]["0.5"] > 0 for f in fids)
        assert all(f["reference"] == "grey" and list(f["kid"]) == ["0.5"] for f in fids)
        assert [f["seed"] for f in fids] == [0, 1]
        assert f"![{kind}](interpolate-{kind}/interpolations.png)" in report
        assert (out / f"interpolate-{kind}" / "interpolations.png").exists()
        probe = json.loads((out / f"probe-{kind}" / "probe.json").read_text())
        assert probe["kind"] == kind and 0 <= probe["linear_probe"]["accuracy"] <= 1
        assert f"| {kind} | {probe['linear_probe']['dim']} | {probe['linear_probe']['accuracy']:.3f} | " in report
    assert "seeds (decoder training and pair draw)" in report
    assert json.loads((out / "preset.json").read_text())["prior"]["builtin"] == "mnist-pixelcnn"


def test_rerun_reuses_every_step(run, capsys):
    root, argv = run
    report = (root / "out" / "report.md").read_bytes()
    capsys.readouterr()
    assert cli.main(argv) == 0
    said = capsys.readouterr().out
    n = len(STEPS)
    assert all(f"[run {k}/{n}] {step}: done before, reused" in said for k, step in enumerate(STEPS, 1)), said
    assert (root / "out" / "report.md").read_bytes() == report
