"""fisher.reports: the paper's numbers, the Figure 3a grid, the Figure 3b / 7 FID table and plot, the
Figure 2/4/5 image layouts and ``fisher run``'s report.md, all as pure functions."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from fisher.reports import figure3a, figure3b, layouts, paper
from fisher.reports import run as run_report

PNG = b"\x89PNG\r\n\x1a\n"


def _rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()]


def _section(md: str, heading: str) -> list[list[str]]:
    """The table rows under ``heading`` (a markdown heading line)."""
    lines = md.splitlines()
    start = lines.index(heading) + 2
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return _rows("\n".join(lines[start:end]))


# ---------------------------------------------------------------- the paper's numbers

def test_paper_numbers_in_one_place():
    f3a = paper.PAPER_FIGURE_3A
    assert f3a["density"] == [0.001, 0.01, 0.1, 1.0] and f3a["dim"] == [64, 256, 1024]
    assert f3a["values"][64] == [0.641, 0.638, 0.678, 0.633]
    assert f3a["values"][256] == [0.653, 0.456, 0.170, 0.155]
    assert f3a["values"][1024] == [0.142, 0.154, 0.129, 0.122]
    assert paper.PAPER_MNIST_FID["rows"]["fisher/conv"][0.125] == 1.14
    assert paper.PAPER_CELEBA_FID["gated"]["rows"]["activation/conv"][0.0] == 56.31
    assert paper.PAPER_MNIST_NLL["rows"] == {"PixelCNN": 81.30, "Gated PixelCNN": 80.10}
    assert "independent-pixel" in paper.PAPER_MNIST_NLL["baseline_note"]


def test_evaluation_reexports_the_reports():
    from fisher import evaluation as ev
    assert ev.PAPER_MNIST_FID is paper.PAPER_MNIST_FID and ev.PAPER_CELEBA_FID is paper.PAPER_CELEBA_FID
    assert ev.fid_table is figure3b.fid_table and ev.fid_plot is figure3b.fid_plot


def test_reports_never_import_ray():
    code = ("import sys, fisher.reports.run, fisher.reports.figure3a, fisher.reports.figure3b, "
            "fisher.reports.layouts, fisher.reports.paper; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'raycluster')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- Figure 3a

def test_paper_figure_3a_table_has_the_paper_layout():
    rows = _rows(figure3a.paper_table())
    assert rows[0] == ["dim \\ density", "0.001", "0.01", "0.1", "1"]
    assert set(rows[1]) <= {"---:", ""}
    assert rows[2:] == [["64", "0.641", "0.638", "0.678", "0.633"],
                        ["256", "0.653", "0.456", "0.170", "0.155"],
                        ["1024", "0.142", "0.154", "0.129", "0.122"]]


def _records(grid):
    recs = []
    for i, dim in enumerate(grid["dim"]):
        for j, dens in enumerate(grid["density"]):
            recs.append({"dim": dim, "density": dens, "test_bce_nats_per_pixel": 0.1 * (i + 1) + 0.01 * j,
                         "test_mse": 0.001 * (10 * i + j), "n_train": 60, "n_test": 10})
    return recs


def test_grid_markdown_rows_are_dims_columns_densities():
    grid = {"density": [0.01, None], "dim": [8, 16]}
    records = _records(grid)
    plan = {"kind": "fisher", "seed": 3,
            "decoder": {"decoder": "conv", "epochs": 2, "batch_size": 32, "lr": 1e-3, "seed": 3}}
    md = figure3a.grid_markdown(grid, records, plan, prior="P", data="D")
    assert md.startswith("# Reconstruction error by projection density × dimension (paper Figure 3a)")
    assert "prior `P`, data `D`" in md and "trained on 60 train images, evaluated on 10 test images" in md
    bce = _section(md, "## Test BCE (nats per pixel)")
    assert bce[0] == ["dim \\ density", "0.01", "auto"]
    assert bce[2:] == [["8", "0.1000", "0.1100"], ["16", "0.2000", "0.2100"]]
    mse = _section(md, "## Test MSE (pixels on [0, 1])")
    assert mse[2:] == [["8", "0.0000", "0.0010"], ["16", "0.0100", "0.0110"]]
    # a missing cell is NaN, not a shifted row
    values = figure3a.matrix(grid, records[:-1], "test_mse")
    assert values[0] == [0.0, 0.001] and values[1][0] == 0.01 and math.isnan(values[1][1])
    assert figure3a.grid_png(grid, records)[:8] == PNG


# ---------------------------------------------------------------- Figure 3b / 7

def test_fid_table_layout_and_paper_rows():
    results = [{"label": "fisher/conv", "fid": {"0": 1.234, "0.5": 5.0}, "pairs": 64},
               {"label": "activation/conv", "fid": {"0": 0.7, "0.25": 3.0, "0.5": float("nan")}, "pairs": 64}]
    rows = _rows(figure3b.fid_table(results))
    assert rows[0] == ["embedding / decoder", "α = 0", "α = 0.25", "α = 0.5", "N pairs"]
    assert set(rows[1]) <= {"---", ""}
    assert rows[2] == ["fisher/conv", "1.23", "–", "5.00", "64"]
    assert rows[3] == ["activation/conv", "0.70", "3.00", "–", "64"]

    rows = _rows(figure3b.fid_table(results, paper.PAPER_MNIST_FID))
    assert rows[0][1:6] == [f"α = {a}" for a in ("0", "0.125", "0.25", "0.375", "0.5")]
    by = {r[0]: r[1:] for r in rows[2:]}
    assert by["fisher/conv (paper, Figure 3b (MNIST))"] == ["1.21", "1.14", "1.03", "2.21", "5.43", "50000"]
    assert by["activation/conv (paper, Figure 3b (MNIST))"] == ["0.68", "0.60", "2.69", "12.84", "25.42", "50000"]
    assert by["fisher/conv"] == ["1.23", "–", "–", "–", "5.00", "64"]
    plain = _rows(figure3b.fid_table([], {"ours": {0.0: 1.0}}))
    assert plain[2] == ["ours (paper)", "1.00", "–"]
    celeba = {r[0]: r[1:] for r in _rows(figure3b.fid_table([], paper.PAPER_CELEBA_FID["pixelcnn"]))[2:]}
    assert celeba["fisher/realnvp (paper, Figure 7 (CelebA))"][-2:] == ["41.83", "50000"]


def test_fid_markdown_with_floor():
    result = {"label": "fisher/conv", "fid": {"0": 9.5, "0.5": 12.25}, "pairs": 8, "weights_id": "w1",
              "real": {"split": "test", "count": 40},
              "real_floor": {"split": "train", "count": 8, "fid": 7.125}}
    md = figure3b.fid_markdown(result)
    head, table = md.split("\n\n")
    assert "N = 8 pairs per α, against 40 real test images; Inception weights w1." in head
    assert "Floor: 8 real train images score 7.12" in head
    by = {r[0]: r[1:] for r in _rows(table.strip())[2:]}
    assert by == {"fisher/conv": ["9.50", "12.25", "8"], "real train images (floor at this N)": ["7.12", "7.12", "8"]}
    assert "Floor" not in figure3b.fid_markdown({**result, "real_floor": None})


def test_kid_table_and_markdown():
    k = lambda mean, err: {"mean": mean, "std": err * 10, "stderr": err, "subsets": 100, "subset_size": 8}
    result = {"label": "fisher/conv", "fid": {"0": 9.5, "0.5": 12.25}, "pairs": 8, "weights_id": "w1",
              "kid": {"0": k(0.0123, 0.0004), "0.5": k(0.05, 0.002)}, "reference": "grey",
              "real": {"split": "test", "count": 40, "features_kept": 40},
              "real_floor": {"split": "train", "count": 8, "fid": 7.125, "kid": k(-0.0001, 0.0003)}}
    rows = _rows(figure3b.kid_table([result, {"label": "old", "fid": {"0": 1.0}, "pairs": 8}]))
    assert rows[0] == ["embedding / decoder", "α = 0", "α = 0.5", "N pairs", "subsets × size"]
    by = {r[0]: r[1:] for r in rows[2:]}
    assert by == {"fisher/conv": ["12.30 ± 0.40", "50.00 ± 2.00", "8", "100 × 8"],
                  "old": ["–", "–", "8", "–"],                          # an fid.json from before KID
                  "real train images (floor at this N)": ["-0.10 ± 0.30", "-0.10 ± 0.30", "8", "100 × 8"]}
    md = figure3b.fid_markdown(result)
    assert "against 40 real test images (grey reference); Inception weights w1." in md
    fid_part, kid_part = md.split("KID × 10³ ± standard error × 10³")
    assert "| fisher/conv | 9.50 | 12.25 | 8 |" in fid_part and "against 40 of the real images' features" in kid_part
    assert "| fisher/conv | 12.30 ± 0.40 | 50.00 ± 2.00 | 8 | 100 × 8 |" in kid_part
    assert "KID" not in figure3b.fid_markdown({**result, "kid": {}})
    assert figure3b.fid_table([result]) == figure3b.fid_table([result], None)     # the report's call still works


def test_fid_plot_png():
    png = figure3b.fid_plot([{"label": "fisher/conv", "fid": {"0": 1.0, "0.5": 2.0}}], paper.PAPER_MNIST_FID)
    assert png[:8] == PNG


# ---------------------------------------------------------------- Figures 2, 4, 5: image layouts

def test_interpolation_image_layout():
    p, a, h, w, pad = 2, 3, 2, 3, 2
    decoded = torch.empty(p, a, 1, h, w)
    for i in range(p):
        for k in range(a):
            decoded[i, k] = (10 * i + k + 1) / 255            # tile (i, k) is grey level 10i + k + 1
    true = np.zeros((p, 2, h, w, 1), np.uint8)
    true[:, 1] = 1                                              # binary data: x2 white, x1 black
    img = layouts.interpolation_image(decoded, true, levels=2, pad=pad)
    assert img.dtype == np.uint8 and img.shape == (p * (h + pad) + pad, (a + 2) * (w + pad) + pad, 1)

    def tile(r, c):
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        return img[y:y + h, x:x + w, 0]
    for i in range(p):
        assert (tile(i, 0) == 0).all() and (tile(i, a + 1) == 255).all()
        for k in range(a):
            assert (tile(i, k + 1) == 10 * i + k + 1).all()
    assert (img[:pad] == 255).all() and (img[:, :pad] == 255).all()       # padding
    # NumPy input gives the same image
    assert np.array_equal(layouts.interpolation_image(decoded.numpy(), true, 2, pad), img)


def test_edit_image_layout():
    n, h, w = 3, 4, 4
    true = np.full((n, h, w, 3), 31, np.uint8)                  # 32 levels: the top level → 255
    true[1] = 0
    edited = np.stack([np.full((n, 1, h, w), v, np.float32).repeat(3, 1) for v in (0.0, 0.5, 1.0)], axis=1)
    img = layouts.edit_image(true, edited, levels=32)
    assert img.shape == (n * (h + 2) + 2, 4 * (w + 2) + 2, 3)
    cols = [img[2:2 + h, 2 + c * (w + 2):2 + c * (w + 2) + w] for c in range(4)]
    assert (cols[0] == 255).all() and (cols[1] == 0).all() and (cols[2] == 128).all() and (cols[3] == 255).all()
    row1 = img[2 + (h + 2):2 + (h + 2) + h, 2:2 + w]
    assert (row1 == 0).all()
    with pytest.raises(Exception, match="levels"):
        layouts.edit_image(true, edited, levels=2)              # values 31 do not fit 2 levels


# ---------------------------------------------------------------- fisher run's report.md

def test_prior_description_is_generic():
    assert run_report.prior_description({"model": {"n_layers": 3, "filters": 32}}) == "PixelCNN 3 layers × 32 filters"
    assert run_report.prior_description({"prior": "pixelcnn", "model": {"n_layers": 5, "filters": 64,
                                                                         "kernel_size": 7}}) == \
        "PixelCNN 5 layers × 64 filters"
    assert run_report.prior_description({"prior": "pyramid", "model": {"levels": 2, "width": 16}}) == \
        "Pyramid PixelCNN (width=16)"
    assert run_report.prior_description({"prior": "toy", "model": {"width": 16}}) == "toy (width=16)"


@pytest.fixture()
def run_dir(tmp_path, mnist_dir):
    """A run directory with the artifacts report.md reads (prepared data, manifests, fid.json)."""
    from fisher.data import MnistConfig, prepare_mnist
    from fisher.io import write_manifest
    out = tmp_path / "run"
    prepare_mnist(MnistConfig(src=str(mnist_dir), limit=20, shard_size=8), str(out / "data"))
    write_manifest(str(out / "prior"), "train-prior", {"prior": "pixelcnn", "model": {"n_layers": 1, "filters": 8}},
                   metrics={"epoch": 1, "test_nll_nats": 123.456, "test_bits_per_dim": 0.2272})
    for kind, bce in (("fisher", 0.125), ("activation", 0.25)):
        write_manifest(str(out / f"decoder-{kind}"), "train-decoder", {"column": "z", "decoder": "conv"},
                       metrics={"test_bce_nats_per_pixel": bce, "test_mse": bce / 10})
        (out / f"fid-{kind}").mkdir()
        (out / f"fid-{kind}" / "fid.json").write_text(json.dumps(
            {"label": f"{kind}/conv", "fid": {"0": 3.0, "0.5": 4.0}, "pairs": 4,
             "real": {"split": "test", "count": 20}, "real_floor": None}))
    (out / "baselines").mkdir()
    (out / "baselines" / "baselines.json").write_text(json.dumps(
        {"split": "test", "prior": {"nll_nats": 120.5, "n_test": 20},
         "independent_pixel": {"nll_nats_per_image": 210.25}}))
    (out / "probe-fisher").mkdir()
    (out / "probe-fisher" / "probe.json").write_text(json.dumps(
        {"target": "label", "n_train": 20, "n_test": 20, "linear_probe": {"accuracy": 0.75, "dim": 16, "ridge": 0.1},
         "knn": {"k": 10, "agreement": 0.5}, "majority": {"accuracy": 0.2}}))
    (out / "sweep").mkdir()
    (out / "sweep" / "grid.md").write_text("# Grid\n\n## Test BCE (nats per pixel)\n\n| dim \\ density | 1 |\n")
    return out


def test_report_markdown(run_dir):
    preset = {"_name": "toy", "dataset": "mnist", "description": "A toy run.", "prepare": {"limit": 20},
              "decoder": {"decoder": "conv", "epochs": 1}, "evaluate": {"pairs": 4}, "sweep": {"epochs": 1}}
    paper_preset = {"prepare": {"seed": 0}, "prior": {"layers": 5, "filters": 64}, "decoder": {"decoder": "conv"},
                    "evaluate": {"pairs": 50000}}
    kinds = {"fisher": ("emb", "z"), "activation": ("emb-a", "z")}
    md = run_report.report_markdown(str(run_dir), preset, kinds, {"prepare": 1.5, "train-prior": 2.0}, paper_preset)
    assert md.startswith("# Fisher-score run: preset `toy`")
    assert "PixelCNN 1 layers × 8 filters, 1 epochs, trained by this run: test NLL **123.46 nats/image**" in md
    assert "PixelCNN 81.30, Gated PixelCNN 80.10" in md
    assert "On this run's 20 test images: the prior **120.50** nats/image; the independent-pixel model" in md
    assert "210.25" in md
    # ours demoted under the report's heading, then the paper's Figure 3a in the same layout
    assert "### Grid" in md and "#### Test BCE (nats per pixel)" in md
    assert "| 256 | 0.653 | 0.456 | 0.170 | 0.155 |" in md
    assert "| fisher | `z` | conv | 0.1250 | – | 0.0125 | 1 |" in md and "| activation | `z` | conv | 0.2500 | – | 0.0250 | 1 |" in md
    assert "| none: the train split's mean image |" in md
    lines = md.splitlines()
    assert "| fisher/conv | 3.00 | 4.00 | 1 | 4 |" in lines and "| fisher/conv (paper) | 1.21 | 5.43 | 1 | 50000 |" in lines
    assert "each test image's 10 nearest train neighbours" in md
    assert "| fisher | 16 | 0.750 | 0.1 | 0.500 |" in lines and "| majority label | – | 0.200 | – | – |" in lines
    assert "a 1-layer, 8-filter PixelCNN trained for 1 epoch(s)" in md
    assert "(preset `mnist-paper`) has all the data, a 5-layer, 64-filter PixelCNN, conv decoders and 50000" in md
    assert "| total | 3.5 |" in md
    uri = run_report.write_report(str(run_dir), preset, kinds, {"prepare": 1.5, "train-prior": 2.0}, paper_preset)
    assert (run_dir / "report.md").read_text() == md and uri.endswith("report.md")
    # without the paper preset, the comparison paragraph still reads
    assert "This run used the first 20 images" in run_report.report_markdown(str(run_dir), preset, kinds, {})


def test_a_label_with_a_pipe_or_newline_stays_one_table_cell():
    from fisher.reports.figure3b import fid_table, kid_table
    result = {"label": "fisher|conv\nrun 2", "fid": {"0": 1.0}, "kid": {"0": {"mean": 1e-3, "stderr": 1e-4}},
              "pairs": 3}
    for table in (fid_table([result]), kid_table([result])):
        row = table.splitlines()[2]
        assert row.startswith("| fisher\\|conv run 2 | ") and row.replace("\\|", "").count("|") == \
            table.splitlines()[0].count("|"), table


def test_several_priors_report(run_dir):
    """A run with two priors: each prior's own report under its label, and on top the priors' NLLs and one
    FID table per prior (paper Figure 7), with the pixel baseline, made once, in each."""
    import shutil
    from fisher.io import write_manifest
    for label in ("a", "b"):
        (run_dir / label).mkdir()
        for name in ("prior", "baselines", "probe-fisher", "decoder-fisher", "decoder-activation", "fid-fisher",
                     "fid-activation"):
            shutil.copytree(run_dir / name, run_dir / label / name)
    write_manifest(str(run_dir / "b" / "prior"), "train-prior", {"prior": "gated", "model": {"filters": 4}},
                   metrics={"epoch": 2, "test_nll_nats": 100.0, "test_bits_per_dim": 0.184})
    (run_dir / "fid-pixel").mkdir()
    (run_dir / "fid-pixel" / "fid.json").write_text(json.dumps(
        {"label": "pixel/pixels", "fid": {"0": 1.0, "0.5": 2.0}, "pairs": 4, "real": {"split": "test", "count": 20},
         "real_floor": None}))
    preset = {"_name": "two", "dataset": "celeba", "description": "Two priors.", "decoder": {"decoder": "conv"},
              "evaluate": {"pairs": 4}}
    kinds = lambda label: {"fisher": (f"{label}/emb", "z"), "activation": (f"{label}/emb-a", "z")}   # noqa: E731
    runs = {"a": kinds("a"), "b": kinds("b"), "": {"pixel": ("emb-pixel", "z")}}
    priors = {"a": str(run_dir / "a" / "prior"), "b": str(run_dir / "b" / "prior")}
    timings = {"prepare": 1.0, "a/embed-fisher": 2.0, "b/embed-fisher": 3.0}
    uri = run_report.write_run_reports(str(run_dir), preset, runs, priors, timings)
    top = (run_dir / "report.md").read_text()
    assert uri.endswith("report.md") and top.startswith("# Fisher-score run: preset `two`, 2 priors")
    lines = top.splitlines()
    assert any(line.startswith("| a | PixelCNN 1 layers × 8 filters | ") and "| 0.227 | 120.5 | 210.2 |" in line
               and line.endswith("[a/report.md](a/report.md) |") for line in lines)
    assert any(line.startswith("| b | Gated PixelCNN (filters=4) | ") for line in lines)
    tables = top.split("### ")[1:]
    assert [t.split("\n")[0] for t in tables] == ["PixelCNN (`a`)", "Gated PixelCNN (`b`)"]
    for t in tables:
        assert "| fisher/conv | 3.00 | 4.00 | 1 | 4 |" in t and "| pixel/pixels | 1.00 | 2.00 | 1 | 4 |" in t
    assert "| pixelcnn" not in top and "| fisher/conv (paper) | 132.47 | 134.43 |" in tables[0]
    assert "| fisher/conv (paper) | 129.45 | 134.38 |" in tables[1]
    own = (run_dir / "a" / "report.md").read_text()
    assert own.startswith("# Fisher-score run: preset `two, prior a`") and "| a/embed-fisher |" not in own
    assert "| embed-fisher | 2.0 |" in own and "![fisher](interpolate-fisher/interpolations.png)" in own


def test_several_decoders_report(run_dir):
    """A preset with ``decoders`` (paper Figure 7: conv and RealNVP rows): one FID row per embedding kind ×
    decoder with the paper's rows of both decoders, the difference at α = 0.5 per decoder, probes per kind."""
    import shutil
    from fisher.io import write_manifest
    preset = {"_name": "figure7", "dataset": "celeba", "description": "Two decoders.", "evaluate": {"pairs": 4},
              "decoders": {"conv": {"decoder": "conv", "epochs": 1},
                           "realnvp": {"decoder": "realnvp", "epochs": 2, "temperature": 0.7}}}
    fid = {"fisher-conv": (3.0, 4.0), "activation-conv": (2.0, 5.0), "fisher-realnvp": (1.0, 2.0),
           "activation-realnvp": (1.5, 3.0)}
    for row, (a0, a5) in fid.items():
        kind, _, dec = row.partition("-")
        for k, sfx in enumerate(("-s0", "-s1")):
            write_manifest(str(run_dir / f"decoder-{row}{sfx}"), "train-decoder",
                           {"column": "z", "decoder": dec, "decoder_config": {"temperature": 0.7} if dec == "realnvp"
                            else {}}, metrics={"test_bce_nats_per_pixel": 2.0 + k, "test_mse": 0.1,
                                               **({"test_nll_nats_per_image": 100 * (2.0 + k),      # 100 pixels
                                                   "test_nll_shuffled_z_nats_per_image": 100 * (2.0 + k) + 10 * (k + 1)}
                                                  if dec == "realnvp" else {})})
            (run_dir / f"fid-{row}{sfx}").mkdir()
            (run_dir / f"fid-{row}{sfx}" / "fid.json").write_text(json.dumps(
                {"label": f"{kind}/{dec}", "fid": {"0": a0 + k, "0.5": a5 + k}, "pairs": 4,
                 "real": {"split": "test", "count": 20}, "real_floor": None}))
    shutil.copytree(run_dir / "probe-fisher", run_dir / "probe-activation")
    rows = {row: ("emb", "z") for row in fid}
    assert run_report.decoder_sections(preset) == preset["decoders"]
    assert [run_report.row_name(k, d) for k, d in (("fisher", ""), ("fisher", "realnvp"))] == ["fisher", "fisher-realnvp"]
    assert run_report.row_kinds(rows) == ["fisher", "activation"]
    md = run_report.report_markdown(str(run_dir), preset, rows, {}, suffixes=("-s0", "-s1"))
    lines = md.splitlines()
    assert "| fisher/realnvp | 1.50 ± 0.71 | 2.50 ± 0.71 | 2 | 4 |" in lines
    assert "| fisher/conv (paper) | 132.47 | 134.43 | 1 | 50000 |" in lines       # PixelCNN prior, both decoders
    assert "| fisher/realnvp (paper) | 30.27 | 41.83 | 1 | 50000 |" in lines
    assert "| fisher | `z` | realnvp (T = 0.7) | 2.5000 | 0.1500 | 0.1000 | 2 |" in lines   # gain from z: mean of 0.1, 0.2
    assert "| fisher | `z` | conv | 2.5000 | – | 0.1000 | 2 |" in lines
    diffs = [line for line in lines if line.startswith("At α = 0.5 (") and "FID of" in line]
    assert [d.split(")")[0] for d in diffs] == ["At α = 0.5 (conv decoders", "At α = 0.5 (realnvp decoders"]
    assert "-1.00 ± 0.71" in diffs[0] and "-1.00 ± 0.71" in diffs[1]
    assert sum(line.startswith("| fisher | 16 |") for line in lines) == 1          # probes: once per kind
    assert sum(line.startswith("| activation | 16 |") for line in lines) == 1
    assert "conv decoders trained for 1 epoch(s); realnvp decoders trained for 2 epoch(s)" in md
    assert "![fisher-realnvp](interpolate-fisher-realnvp/interpolations.png)" in md
