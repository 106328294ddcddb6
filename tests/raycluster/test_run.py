"""``fisher run`` end to end with a tiny preset file: every step, the report, what reaches the terminal and
the log, and a rerun that reuses every step.

The preset is the shape of ``mnist-small`` at toy scale (64 images per split, the builtin prior, a
one-cell sweep, one-epoch decoders, two seeds, Fisher scores, pixels and the PixelVAE and RealNVP latents,
both models trained by the run); FID runs the real Inception
weights on 4 pairs × 1 α against 8 real images, so the test is skipped without the weights file.
The run is the ``fisher`` executable in a process of its own (``python -m raycluster.cli``), so that its
terminal is the pipes this test reads.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import SHARED_DATA

from raycluster import cli
from raycluster.run import PRESETS

WEIGHTS = SHARED_DATA / "pt_inception-2015-12-05-nofc.pth"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not WEIGHTS.exists(), reason=f"{WEIGHTS} absent (set FISHER_SHARED_DATA)")]

STEPS = ["prepare", "baselines", "sweep", "embed-pixel"]
for _kind in ("fisher", "pixel", "pixelvae", "realnvp"):
    STEPS += ([f"train-{_kind}", f"embed-{_kind}"] if _kind in ("pixelvae", "realnvp") else []) + [f"probe-{_kind}"] \
        + ([f"decoder-{_kind}-s0", f"decoder-{_kind}-s1"] if _kind == "fisher" else [f"decoder-{_kind}"]) \
        + [f"interpolate-{_kind}", f"fid-{_kind}-s0", f"fid-{_kind}-s1"]


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
        "latents": {"pixelvae": {"train": True, "epochs": 1, "batch_size": 32, "latent_dim": 4, "pixel_layers": 1,
                                 "filters": 4, "is_samples": 3, "is_images": 8, "cpus_per_worker": 0.5},
                    "realnvp": {"train": True, "epochs": 1, "batch_size": 32, "scales": 2, "blocks": 1, "features": 4,
                                "cpus_per_worker": 0.5}},
        "sweep": {"grid": str(grid), "epochs": 1, "batch_size": 32, "cpus_per_trial": 0.5},
    }
    (root / "toy.json").write_text(json.dumps(preset))
    argv = ["run", "--preset", str(root / "toy.json"), "--data", str(mnist_dir), "--out", str(root / "out"),
            "--fid-weights", str(WEIGHTS)]
    proc = subprocess.run([sys.executable, "-m", "raycluster.cli", *argv], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    yield root, argv, proc
    ray.shutdown()


# what Ray itself prints (forwarded worker lines, raylet warnings, Tune's tables, Train/Data internals, tracebacks)
RAY_LINE = re.compile(r"pid=\d+|\(raylet\)|\b(INFO|WARNING|DEBUG)\b|Trial (status|\S+ (started|completed))|[╭│╰]|"
                      r"PlacementGroupCleaner|TrainController|logging_progress|Ray Data|Started a local Ray|"
                      r"View detailed results|Traceback|Warning:")
BAR = re.compile(r"^[\w ()-]+: +\d+%\|[^|]*\| [\d.]+/[\d.]+ \[[\d:<?]+")      # a tqdm progress line


def test_terminal_shows_steps_results_and_progress_only(run):
    root, _, proc = run
    out_lines = proc.stdout.splitlines()
    err_lines = [p for line in proc.stderr.splitlines() for p in line.split("\r") if p.strip()]
    assert not [line for line in out_lines + err_lines if RAY_LINE.search(line)]
    assert err_lines and all(BAR.match(line) for line in err_lines), [x for x in err_lines if not BAR.match(x)][:5]
    n = len(STEPS)
    for k, step in enumerate(STEPS, 1):           # each step: a start line and a finish line, in order
        start = out_lines.index(next(line for line in out_lines if line.startswith(f"[run {k}/{n}] {step}: fisher ")))
        assert any(line.startswith(f"[run {k}/{n}] {step}: finished in ") for line in out_lines[start + 1:]), step
    said = proc.stdout
    for result in ("baselines: prior ", "embeddings written to ", "decoder written to ", "probe of fisher `z`: ",
                   "interpolations of 2 test pairs", "evaluate: fisher/conv: α = 0.5 FID ", "report: "):
        assert result in said, result
    bars = {line.split(":", 1)[0] for line in err_lines}
    assert {"embed", "sweep (1 cells)", "train-decoder", "real images", "interpolations"} <= bars, bars
    assert all(any(re.match(rf"{re.escape(b)}: +100%", line) for line in err_lines) for b in bars), bars


def test_log_holds_rays_lines(run):
    root, _, proc = run
    logs = list((root / "out" / "logs").glob("run-*.log"))
    assert len(logs) == 1 and str(logs[0]) in proc.stdout            # the report line names it
    text = logs[0].read_text()
    assert re.search(r"^\((\S+ )?pid=\d+", text, re.M)                 # Ray's forwarded worker lines
    assert "Trial status" in text and "TrainController" in text    # Tune's table, Train's controller
    assert "[run 1/" in text and "decoder written to " in text      # and the run's own lines, in order
    assert "\x1b[" not in text                                      # without terminal colour codes


def test_every_step_and_the_report(run):
    root, _, _ = run
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
                    "## Timings (seconds, this run)", "## Environment"):
        assert heading in report, heading
    from importlib.metadata import version
    import os
    env = report.split("## Environment", 1)[1]
    assert f"ray {version('ray')}" in env and f"torch {version('torch')}" in env and f"{os.cpu_count()} CPUs" in env
    assert "| fisher | `z` | conv |" in report and "| activation |" not in report
    pixel_row = next(line for line in report.splitlines() if line.startswith("| pixel | `z` | pixels | – | "))
    assert 0 < float(pixel_row.split("|")[6]) < 0.05       # grey originals vs their binarization: small, not 0
    fisher_dec = json.loads((out / "decoder-fisher-s0" / "manifest.json").read_text())["metrics"]
    assert fisher_dec["test_nll_shuffled_z_nats_per_image"] > 0          # measured after the last epoch, reported
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
    # the PixelVAE baseline: trained by the run, its latent embedded unprojected and decoded by its own decoder
    vae = json.loads((out / "pixelvae-model" / "manifest.json").read_text())["metrics"]
    assert vae["test_nll_bound"] == "ELBO" and vae["is_samples"] == 3 and vae["is_images"] == 8
    emb = json.loads((out / "emb-pixelvae" / "manifest.json").read_text())
    assert emb["config"]["kind"] == "pixelvae" and emb["columns"]["z"]["dim"] == 4
    dec = json.loads((out / "decoder-pixelvae" / "manifest.json").read_text())
    assert dec["config"]["decoder_config"]["model"] == "pixelvae" and dec["metrics"]["test_bce_nats_per_pixel"] > 0
    assert "## Latent-variable baselines (the seed papers' models)" in report
    assert "| pixelvae | `z` | PixelVAE's own (sampled) |" in report
    # the RealNVP baseline on the same images: its exact latent (784 numbers) decodes to the images themselves
    flow = json.loads((out / "realnvp-model" / "manifest.json").read_text())["metrics"]
    assert flow["test_nll_bound"] == "dequantized" and "test_is_nll_nats" not in flow
    assert json.loads((out / "emb-realnvp" / "manifest.json").read_text())["columns"]["z"]["dim"] == 28 * 28
    dec = json.loads((out / "decoder-realnvp" / "manifest.json").read_text())
    assert dec["metrics"]["test_mse"] == 0 and dec["metrics"]["test_bce_nats_per_pixel"] is None
    assert "| realnvp | `z` | RealNVP's own (f⁻¹, exact) | – | – | 0.0000 |" in report


def test_rerun_reuses_every_step(run, capsys):
    root, argv, _ = run
    report = (root / "out" / "report.md").read_bytes()
    capsys.readouterr()
    assert cli.main(argv) == 0
    said = capsys.readouterr().out
    n = len(STEPS)
    assert all(f"[run {k}/{n}] {step}: done before, reused" in said for k, step in enumerate(STEPS, 1)), said
    assert (root / "out" / "report.md").read_bytes() == report


def test_several_decoders_plan_one_row_per_kind_and_decoder(tmp_path):
    """``celeba-small`` has two ``decoders`` (paper Figure 7's conv and RealNVP rows): each embedding kind gets a
    decoder, strips, edits and FID per decoder, its probe once; the pixel baseline keeps its identity decoder;
    ``--set decoders.<label>.<key>`` reaches one decoder's options. No Ray: the plan only."""
    from raycluster.run import RunOptions, load_preset, plan
    args = RunOptions(preset="celeba-small", data=str(tmp_path), out=str(tmp_path / "out"),
                      set=["decoders.realnvp.epochs=2"])
    steps, runs = plan(args, load_preset(args.preset, args.set))
    names = [s.name for s in steps]
    assert list(runs["pixelcnn"]) == ["fisher-conv", "fisher-realnvp", "activation-conv", "activation-realnvp"]
    assert list(runs[""]) == ["pixel", "realnvp"]
    for step in ("decoder", "interpolate", "edit", "fid"):
        assert f"gated/{step}-fisher-realnvp" in names and f"gated/{step}-activation-conv" in names
    assert names.count("pyramid/probe-fisher") == 1 and "decoder-pixel" in names and "fid-pixel" in names
    # the RealNVP latent (preset key "latents"): made once, at the top, its builtin model not retrained, decoded
    # by its own inverse (one decoder), with strips, edits, probes and FID like every row
    assert "train-realnvp" not in names and names.count("decoder-realnvp") == 1
    assert {"embed-realnvp", "probe-realnvp", "interpolate-realnvp", "edit-realnvp", "fid-realnvp"} <= set(names)
    latent = {s.name: s.options for s in steps}
    assert latent["embed-realnvp"].prior == "builtin:celeba32-realnvp" and latent["embed-realnvp"].pca is None
    assert latent["decoder-realnvp"].decoder == "latent" and runs[""]["realnvp"][1] == "z"
    by_name = {s.name: s.options for s in steps}
    nvp = by_name["pixelcnn/decoder-fisher-realnvp"]
    assert (nvp.decoder, nvp.epochs, nvp.decoder_config["features"]) == ("realnvp", 2, 16)
    assert by_name["pixelcnn/decoder-fisher-conv"].epochs == 5
    assert by_name["pixelcnn/fid-fisher-realnvp"].label == "fisher/realnvp"
    assert by_name["pixelcnn/fid-fisher-realnvp"].decoder.endswith("pixelcnn/decoder-fisher-realnvp")
    single, _ = plan(RunOptions(preset="mnist-small", out=str(tmp_path / "m")), load_preset("mnist-small", []))
    assert "decoder-fisher" in [s.name for s in single] and "fid-activation" in [s.name for s in single]


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESETS.glob("*.json")))
def test_every_shipped_preset_plans(name, tmp_path):
    """Every preset in raycluster/presets plans: each value is an option of its step and passes its checks
    (a misspelt key in a GPU-cluster preset is found here, not on the cluster)."""
    from raycluster.run import RunOptions, load_preset, plan
    preset = load_preset(name, [])
    steps, runs = plan(RunOptions(preset=name, data=str(tmp_path), out=str(tmp_path / "out")), preset)
    assert steps and all(runs.values())


@pytest.mark.parametrize("bad, message", [
    ("nan", r"emb-pixelvae/test-\d+\.parquet: column 'z' holds NaN or Inf in 1 of \d+ rows"),
    ("kind", r"emb-pixelvae/test-\d+\.parquet: made with kind 'pixel', but .*emb-pixelvae with kind 'pixelvae'; "
             r"a shard of another `fisher embed` run was mixed in"),
    ("prior", r"not the prior .*emb-pixelvae was made with \(it was retrained or replaced\); rerun `fisher embed`"),
])
def test_latent_embeddings_pass_the_same_checks(run, tmp_path, capsys, bad, message):
    """The PixelVAE row's shards are checked like every kind's: a NaN, a shard of another kind mixed in, and (for
    its own decoder) a model replaced since ``fisher embed`` are refused with one line."""
    import shutil

    import numpy as np
    import pyarrow.parquet as pq

    from fisher.embedding import column_array, embedding_table
    from fisher.io import atomic_write_table
    root, _, _ = run
    out = root / "out"
    emb = shutil.copytree(out / "emb-pixelvae", tmp_path / "emb-pixelvae")
    shard = next(emb.glob("test-*.parquet"))
    t = pq.read_table(shard)
    meta, z = json.loads(t.schema.metadata[b"fisher"]), column_array(t["z"]).copy()
    prior = json.loads((emb / "manifest.json").read_text())["prior"]
    if bad == "nan":
        z[1, 0] = np.nan
    elif bad == "kind":
        meta["kind"] = "pixel"
    else:                           # the model the embeddings name has been retrained since
        model = shutil.copytree(prior, tmp_path / "model")
        m = json.loads((model / "manifest.json").read_text())
        m["config"]["epochs"] += 1
        (model / "manifest.json").write_text(json.dumps(m))
        manifest = json.loads((emb / "manifest.json").read_text())
        manifest["prior"] = str(model)
        (emb / "manifest.json").write_text(json.dumps(manifest))
    atomic_write_table(str(shard), embedding_table(np.asarray(t["id"].to_pylist()), {"z": z}, meta))
    argv = (["train-decoder", "--decoder", "latent", "--embeddings", str(emb), "--data", str(out / "data"),
             "--out", str(tmp_path / "dec")] if bad == "prior" else
            ["interpolate", "--decoder", str(out / "decoder-pixelvae"), "--embeddings", str(emb),
             "--data", str(out / "data"), "--out", str(tmp_path / "strip")])
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(message, err[-1]), err[-1]
    assert not (tmp_path / "dec" / "manifest.json").exists() and not (tmp_path / "strip" / "interpolations.png").exists()
