"""``report.md`` of ``fisher run``: the paper's tables next to this run's, plots, strips, timings.

Sections follow the paper: the prior (with the seed papers' binarized-MNIST NLLs as reference
points), the reconstruction grid (sec. 5.1, Figure 3a), the decoders, interpolation FID
(Algorithm 1; Figure 3b on MNIST, Figure 7 on CelebA), interpolation strips (Figures 2 and 4) and
attribute edits (Figure 5). :func:`report_markdown` is a function of the run directory's artifacts
(read through :mod:`fisher.io`), the preset, the timings and the paper-scale preset to compare with;
it writes nothing. :func:`write_report` writes ``report.md``.

The artifacts a run directory holds: ``prior/`` (train-prior manifest: ``config['prior']`` is the
prior's registry name, absent in old manifests, meaning "pixelcnn"; ``config['model']`` its
architecture's config), ``data/`` (prepare), ``sweep/grid.md`` (optional), ``decoder-<kind>/``,
``fid-<kind>/fid.json``, ``interpolate-<kind>/``, ``edit-<kind>/``.
"""
from __future__ import annotations

import json

from fisher.io import atomic_write_bytes, exists, join, read_bytes, read_manifest
from fisher.reports.figure3a import paper_table
from fisher.reports.figure3b import fid_table
from fisher.reports.paper import PAPER_FIGURE_3A, PAPER_MNIST_FID, PAPER_MNIST_NLL

PRIOR_LABELS = {"pixelcnn": "PixelCNN"}     # registry name → how the report names the architecture


def _prior_name(config: dict) -> str:
    return config.get("prior") or "pixelcnn"


def _model_args(model: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in model.items())


def prior_description(config: dict) -> str:
    """'PixelCNN 3 layers × 32 filters' for a prior config with ``n_layers`` and ``filters``, else
    '<name> (k=v, ...)' of its model config."""
    name, model = _prior_name(config), config.get("model") or {}
    if "n_layers" in model and "filters" in model:
        return f"{PRIOR_LABELS.get(name, name)} {model['n_layers']} layers × {model['filters']} filters"
    return f"{name} ({_model_args(model)})"


def _prior_phrase(config: dict) -> str:
    """The same as an attribute: 'a 3-layer, 32-filter PixelCNN' or 'a <name> (k=v, ...) prior'."""
    name, model = _prior_name(config), config.get("model") or {}
    if "n_layers" in model and "filters" in model:
        return f"a {model['n_layers']}-layer, {model['filters']}-filter {PRIOR_LABELS.get(name, name)}"
    return f"a {name} ({_model_args(model)}) prior"


def _paper_prior_phrase(section: dict) -> str:
    """The paper preset's prior (its ``prior`` section: train-prior options) as an attribute."""
    if "layers" in section and "filters" in section:
        return f"a {section['layers']}-layer, {section['filters']}-filter prior"
    name = section.get("prior", "pixelcnn")
    rest = {k: v for k, v in section.items()
            if k not in ("prior", "epochs", "batch_size", "lr", "gpu", "workers")}
    return f"a {name} prior" + (f" ({_model_args(rest)})" if rest else "")


def demoted(markdown: str) -> str:
    """Headings of an included document two levels down, under the report's own."""
    return "\n".join("##" + line if line.startswith("#") else line for line in markdown.splitlines())


def mean_image_baseline(data_dir: str) -> dict | None:
    """Test BCE/MSE/NLL of predicting every image by the train split's per-sub-pixel mean (binary data only):
    the independent-pixel model, one Bernoulli per pixel."""
    import torch

    from fisher.data import load_prepared
    from fisher.decoders import reconstruction_metrics, summarize_metrics
    from fisher.priors import to_model_input
    if int(read_manifest(data_dir, "prepare").get("levels", 0)) != 2:
        return None
    x_train = to_model_input(load_prepared(data_dir, "train")["image"]).double()
    x_test = to_model_input(load_prepared(data_dir, "test")["image"])
    p = x_train.mean(0).clamp(1e-6, 1 - 1e-6)
    logits = torch.log(p / (1 - p)).expand(len(x_test), *p.shape).float()
    return summarize_metrics(reconstruction_metrics(logits, x_test, 2))


def scale_note(preset: dict, prior: dict, paper: dict | None, paper_name: str | None = None) -> str:
    """What differs from the paper's setup in this preset, in one paragraph (so numbers are read right).

    ``prior`` is the train-prior manifest of the run; ``paper`` the paper-scale preset of the same
    dataset (e.g. ``mnist-paper``; None: not known), ``paper_name`` its name.
    """
    paper_name = paper_name or f"{preset['dataset']}-paper"
    limit = preset.get("prepare", {}).get("limit")
    data = f"the first {limit} images of each split" if limit else "all the images given"
    dec = preset.get("decoder", {})
    size = preset.get("prepare", {}).get("size")
    text = (f"This run used {data}" + (f" at {size}×{size}" if size else "") + f", {_prior_phrase(prior['config'])} "
            f"trained for {prior['metrics']['epoch']} epoch(s), "
            f"{dec.get('decoder', '?')} decoders trained for {dec.get('epochs', '?')} epoch(s) (sweep cells: "
            f"{(preset.get('sweep') or {}).get('epochs', 'no sweep')}), and "
            f"{preset.get('evaluate', {}).get('pairs', '?')} FID pairs per α.")
    if paper:
        text += (f" The paper's setting (preset `{paper_name}`) has all the data"
                 + (f" at {paper['prepare']['size']}×{paper['prepare']['size']}"
                    if "size" in paper.get("prepare", {}) else "")
                 + f", {_paper_prior_phrase(paper.get('prior', {}))}, {paper['decoder']['decoder']} decoders and "
                 f"{paper['evaluate']['pairs']} FID pairs.")
    return text + (" The protocol, models' shapes, projections and table layouts "
                   f"here are the paper's; the values are comparable with the paper's only for a paper-scale preset "
                   f"(`--preset {paper_name}`). The paper does not define its Figure 3a reconstruction error "
                   "precisely; ours is the test BCE in nats per pixel.")


def report_markdown(out: str, preset: dict, kinds: dict, timings: dict, paper_preset: dict | None = None) -> str:
    """The text of ``report.md`` for the run directory ``out``.

    ``preset``: the run's preset (with '_name'); ``kinds``: {embedding kind: (embedding dir, column)};
    ``timings``: {step: seconds}; ``paper_preset``: the paper-scale preset of the dataset, for the
    comparison paragraph (None leaves the paper's setting out of it).
    """
    d = lambda *p: join(out, *p)                                            # noqa: E731
    lines = [f"# Fisher-score run: preset `{preset['_name']}`", "", preset.get("description", ""), ""]
    prior = read_manifest(d("prior"), "train-prior")
    m = prior["metrics"]
    binary = int(read_manifest(d("data"), "prepare").get("levels", 2)) == 2
    base = mean_image_baseline(d("data"))
    lines += ["## Prior", "", f"{prior_description(prior['config'])}, {m['epoch']} epochs: test NLL "
              f"**{m['test_nll_nats']:.2f} nats/image** ({m['test_bits_per_dim']:.4f} bits/dim).", ""]
    if preset["dataset"] == "mnist" and binary:
        refs = ", ".join(f"{k} {v:.2f}" for k, v in PAPER_MNIST_NLL["rows"].items())
        lines += [f"Reference test NLLs on binarized MNIST ({PAPER_MNIST_NLL['source']}, {PAPER_MNIST_NLL['unit']}): "
                  f"{refs}."
                  + (f" Independent-pixel baseline (the train split's mean image) on this test split: "
                     f"{base['nll_nats_per_image']:.2f} nats/image." if base else ""), ""]
    if exists(d("sweep", "grid.md")):
        lines += ["## Reconstruction grid (paper Figure 3a)", "",
                  "Ours (test BCE, nats/pixel; rows = dimension, columns = density):", "",
                  demoted(read_bytes(d("sweep", "grid.md")).decode().strip()), "",
                  f"Paper ({PAPER_FIGURE_3A['source']}: their reconstruction error, same layout):", "",
                  paper_table(PAPER_FIGURE_3A), "", "![grid](sweep/grid.png)", ""]
    loss = "BCE nats/pixel" if binary else "NLL nats/sub-pixel"
    lines += ["## Decoders (test split)", ""]
    if not binary:
        lines += ["NLL: categorical cross-entropy of each sub-pixel's levels; MSE on [0, 1] values.", ""]
    lines += [f"| embedding | column | {loss} | MSE |", "|---|---|---|---|"]
    for kind, (_, col) in kinds.items():
        dm = read_manifest(d(f"decoder-{kind}"), "train-decoder")["metrics"]
        lines.append(f"| {kind} | `{col}` | {dm['test_bce_nats_per_pixel']:.4f} | {dm['test_mse']:.4f} |")
    if base:
        lines.append(f"| none: the train split's mean image | – | {base['bce_nats_per_pixel']:.4f} | {base['mse']:.4f} |")
        lines += ["", "The last row is what a decoder that ignores its embedding can reach; a decoder is only as "
                  "useful as its distance below it."]
    results = [json.loads(read_bytes(d(f"fid-{k}", "fid.json"))) for k in kinds]
    paper = PAPER_MNIST_FID if preset["dataset"] == "mnist" else None
    n = results[0].get("pairs", results[0].get("n"))
    floor = results[0].get("real_floor")
    lines += ["", "## Interpolation FID (paper Algorithm 1, Figure 3b)", "",
              f"N = {n} pairs per α (the paper uses 50 000); FID against {results[0]['real']['count']} real "
              f"{results[0]['real']['split']} images. Decoded images are the decoder's expected value in [0, 1]."
              + (f" With N = {n}, even real images score {floor['fid']:.1f} (the floor row): FID is biased upwards "
                 "at small N, so read our rows against the floor, not against the paper's." if floor else ""), "",
              fid_table(results, paper), ""]
    lines += [f"![FID vs alpha, {k}](fid-{k}/fid.png)" for k in kinds] + [""]
    lines += ["## Interpolations (paper Figures 2 and 4)", ""]
    lines += [f"{k}:\n\n![{k}](interpolate-{k}/interpolations.png)\n" for k in kinds]
    if preset.get("edit"):
        scale = preset["edit"]["scale"]
        lines += ["## Attribute edits (paper Figure 5)", "",
                  f"Each row: a test image, then the decoded z − {scale:g}·δ, z (the reconstruction) and z + {scale:g}·δ, "
                  "with δ the difference of the attribute's train-split means in embedding space.", ""]
        lines += [f"{k}, {a}:\n\n![{k} {a}](edit-{k}/edit-{a}.png)\n" for k in kinds for a in preset["edit"]["attributes"]]
    lines += ["## How this run compares with the paper", "", scale_note(preset, prior, paper_preset), ""]
    lines += ["## Timings (seconds, this run)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in timings.items()]
    lines += [f"| total | {round(sum(timings.values()), 1)} |"]
    lines += ["", "Every directory here holds the `manifest.json` of the stage that made it; "
              "`preset.json` is the exact configuration."]
    return "\n".join(lines)


def write_report(out: str, preset: dict, kinds: dict, timings: dict, paper_preset: dict | None = None) -> str:
    """Write :func:`report_markdown` to ``out/report.md``; returns its URI."""
    uri = join(out, "report.md")
    atomic_write_bytes(uri, report_markdown(out, preset, kinds, timings, paper_preset).encode())
    return uri
