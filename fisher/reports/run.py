"""``report.md`` of ``fisher run``: the paper's tables next to this run's, plots, strips, timings.

Sections follow the paper: the prior (with the seed papers' binarized-MNIST NLLs as reference
points), the reconstruction grid (sec. 5.1, Figure 3a), the decoders, interpolation FID
(Algorithm 1; Figure 3b on MNIST, Figure 7 on CelebA), interpolation strips (Figures 2 and 4) and
attribute edits (Figure 5). :func:`report_markdown` is a function of the run directory's artifacts
(read through :mod:`fisher.io`), the preset, the timings and the paper-scale preset to compare with;
it writes nothing. :func:`write_report` writes ``report.md``.

The artifacts a run directory holds: ``prior/`` (train-prior manifest: ``config['prior']`` is the
prior's registry name, absent in old manifests, meaning "pixelcnn"; ``config['model']`` its
architecture's config), ``data/`` (prepare), ``sweep/grid.md`` (optional), ``probe-<kind>/`` and per report
row (an embedding kind, or ``<kind>-<decoder label>`` where the preset has several ``decoders``)
``decoder-<row>/``, ``fid-<row>/fid.json``, ``interpolate-<row>/``, ``edit-<row>/``.
"""
from __future__ import annotations

import json
import math

from fisher.io import atomic_write_bytes, exists, join, read_bytes, read_json, read_manifest
from fisher.reports.figure3a import paper_table
from fisher.reports.paper import PAPER_CELEBA_FID, PAPER_FIGURE_3A, PAPER_LATENT_NLL, PAPER_MNIST_FID, PAPER_MNIST_NLL

PRIOR_LABELS = {"pixelcnn": "PixelCNN", "gated": "Gated PixelCNN", "pyramid": "Pyramid PixelCNN",   # registry
                "pixelvae": "PixelVAE", "realnvp": "RealNVP"}
FIXED_DECODER_KINDS = ("pixel", "pixelvae", "realnvp")     # rows decoded by one fixed decoder, whatever the seeds


DATA_KEYS = ("channels", "levels")          # config keys set from the data, left out of descriptions


def decoder_sections(preset: dict) -> dict[str, dict]:
    """{label: decoder section}: ``{"": decoder}`` for a one-decoder preset; the ``decoders`` object of a
    preset that compares several (paper Figure 7: conv and RealNVP rows), whose steps write
    ``decoder-<kind>-<label>/``, ``fid-<kind>-<label>/`` and so on: one report row ``<kind>-<label>`` each."""
    return dict(preset["decoders"]) if preset.get("decoders") else {"": preset.get("decoder") or {}}


def latent_location(out: str, kind: str, section: dict) -> str:
    """The model of a preset's ``latents.<kind>`` section: ``builtin:<builtin>`` unless ``train`` is true,
    else ``OUT/<kind>-model``."""
    if section.get("builtin") is not None and not section.get("train", True):
        return f"builtin:{section['builtin']}"
    return join(out, f"{kind}-model")


def row_name(kind: str, decoder_label: str) -> str:
    """The report row (and directory suffix) of one embedding kind decoded by one decoder section."""
    return f"{kind}-{decoder_label}" if decoder_label else kind


def row_kind(row: str) -> str:
    """The embedding kind of a report row (kinds and decoder labels hold no '-')."""
    return row.partition("-")[0]


def row_kinds(rows) -> list[str]:
    """The embedding kinds of report rows, each once, in order."""
    return list(dict.fromkeys(row_kind(r) for r in rows))


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
    own = {k: v for k, v in model.items() if k not in DATA_KEYS}
    return f"{PRIOR_LABELS.get(name, name)} ({_model_args(own)})"


def _prior_phrase(config: dict) -> str:
    """The same as an attribute: 'a 3-layer, 32-filter PixelCNN' or 'a <name> (k=v, ...) prior'."""
    name, model = _prior_name(config), config.get("model") or {}
    if "n_layers" in model and "filters" in model:
        return f"a {model['n_layers']}-layer, {model['filters']}-filter {PRIOR_LABELS.get(name, name)}"
    return f"a {name} ({_model_args(model)}) prior"


def _paper_prior_phrase(section: dict) -> str:
    """The paper preset's prior (its ``prior`` section: train-prior options) as an attribute."""
    if "layers" in section and "filters" in section:
        name = section.get("prior", "pixelcnn")
        return f"a {section['layers']}-layer, {section['filters']}-filter {PRIOR_LABELS.get(name, name + ' prior')}"
    name = section.get("prior", "pixelcnn")
    rest = {k: v for k, v in section.items()
            if k not in ("prior", "epochs", "batch_size", "lr", "gpu", "workers")}
    return f"a {name} prior" + (f" ({_model_args(rest)})" if rest else "")


def _paper_priors(paper: dict) -> str:
    """The paper preset's prior(s) as a phrase: its ``prior`` section, or each of its ``priors``."""
    if paper.get("priors"):
        phrases = [_paper_prior_phrase(v) for v in paper["priors"].values()]
        return "priors " + ", ".join(phrases[:-1]) + " and " + phrases[-1] if len(phrases) > 1 else phrases[0]
    return _paper_prior_phrase(paper.get("prior", {}))


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
    decoders = "; ".join(f"{dec.get('decoder', '?')} decoders trained for {dec.get('epochs', '?')} epoch(s)"
                         for dec in decoder_sections(preset).values())
    size = preset.get("prepare", {}).get("size")
    text = (f"This run used {data}" + (f" at {size}×{size}" if size else "") + f", {_prior_phrase(prior['config'])} "
            f"trained for {prior['metrics']['epoch']} epoch(s), "
            f"{decoders} (sweep cells: "
            f"{(preset.get('sweep') or {}).get('epochs', 'no sweep')}), and "
            f"{preset.get('evaluate', {}).get('pairs', '?')} FID pairs per α.")
    if paper:
        text += (f" The paper's setting (preset `{paper_name}`) has all the data"
                 + (f" at {paper['prepare']['size']}×{paper['prepare']['size']}"
                    if "size" in paper.get("prepare", {}) else "")
                 + f", {_paper_priors(paper)}, "
                 + ", ".join(d.get("decoder", "?") for d in decoder_sections(paper).values()) + " decoders and "
                 f"{paper['evaluate']['pairs']} FID pairs.")
    return text + (" The protocol, models' shapes, projections and table layouts "
                   f"here are the paper's; the values are comparable with the paper's only for a paper-scale preset "
                   f"(`--preset {paper_name}`). The paper does not define its Figure 3a reconstruction error "
                   "precisely; ours is the test BCE in nats per pixel.")


_RERUN = "delete the step's directory and rerun `fisher run` with the same --out"


def _fid_results(out: str, row: str, suffixes) -> list[dict]:
    return [read_json(join(out, f"fid-{row}{sfx}", "fid.json"), "FID result", _RERUN) for sfx in suffixes
            if exists(join(out, f"fid-{row}{sfx}", "fid.json"))]


def _decoder_dirs(row: str, suffixes) -> list[str]:
    return [f"decoder-{row}"] if row in FIXED_DECODER_KINDS else [f"decoder-{row}{sfx}" for sfx in suffixes]


def _decoder_label(manifest: dict) -> str:
    """A decoder's name in a table: its registry name and, for a sampling decoder, its temperature."""
    config = manifest["config"]
    name = config.get("decoder", "?")
    model = (config.get("decoder_config") or {}).get("model")
    if name == "latent" and model:
        return f"{PRIOR_LABELS.get(model, model)}'s own" + (" (f⁻¹, exact)" if model == "realnvp" else " (sampled)")
    temperature = (config.get("decoder_config") or {}).get("temperature")
    return name + (f" (T = {temperature:g})" if temperature is not None else "")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _num(v, fmt=".4f", scale: float = 1.0) -> str:
    return "–" if v is None else format(v * scale, fmt)


DECODER_NLL_NOTE = ("NLL: of each test image given its embedding, in bits per sub-pixel: exact for the conv and "
                    "PixelCNN decoders (a categorical over each sub-pixel's levels), the dequantized bound for the "
                    "RealNVP (RealNVP sec. 4.1); WGAN-GP has none (–), nor has the RealNVP latent's f⁻¹ (a point "
                    "mass). MSE on [0, 1] values of the decoded image: the conv decoders' expected image, one sample "
                    "for the others. Gain from z: how much worse the NLL gets when each test image is given another test "
                    "image's embedding (same unit); near 0, the decoder models the images without using z, and its "
                    "decodings and FIDs cannot tell embeddings apart.")


def _decoder_loss(binary: bool) -> tuple[str, float]:
    """The decoders table's NLL column and the factor from the stored nats: BCE in nats per pixel for
    binarized MNIST (the paper's Figure 3a unit), bits per sub-pixel for more levels (CelebA's unit)."""
    return ("BCE nats/pixel", 1.0) if binary else ("NLL bits/dim", 1 / math.log(2))


def prior_section(out: str, preset: dict, prior: str, data: str | None = None) -> list[str]:
    """The prior: its test NLL (from its manifest), on this run's test split next to the independent-pixel
    model (``baselines/baselines.json``), and the seed papers' numbers (``data``: default ``out/data``)."""
    from fisher.priors import prior_location
    manifest = read_manifest(prior_location(prior), "train-prior")
    m, builtin = manifest["metrics"], manifest.get("builtin")
    where = (f"the builtin prior `{prior}` (shipped with the package; made by `{builtin['command']}`)"
             if builtin else "trained by this run")
    lines = ["## Prior", "", f"{prior_description(manifest['config'])}, {m['epoch']} epochs, {where}: test NLL "
             f"**{m['test_nll_nats']:.2f} nats/image** ({m['test_bits_per_dim']:.4f} bits/dim) on its full test "
             "split.", ""]
    base_uri = join(out, "baselines", "baselines.json")
    if exists(base_uri):
        b = read_json(base_uri, "baselines record", _RERUN)
        lines += [f"On this run's {b['prior']['n_test']} test images: the prior **{b['prior']['nll_nats']:.2f}** "
                  f"nats/image; the independent-pixel model (one categorical per sub-pixel, fitted on this run's "
                  f"train split) {b['independent_pixel']['nll_nats_per_image']:.2f}. A prior far below that line "
                  "has learned the data's structure.", ""]
    binary = int(read_manifest(data or join(out, "data"), "prepare").get("levels", 2)) == 2
    if preset["dataset"] == "mnist" and binary:
        refs = ", ".join(f"{k} {v:.2f}" for k, v in PAPER_MNIST_NLL["rows"].items())
        lines += [f"Reference test NLLs on binarized MNIST ({PAPER_MNIST_NLL['source']}, {PAPER_MNIST_NLL['unit']}): "
                  f"{refs}.", ""]
    return lines


def latent_section(out: str, preset: dict) -> list[str]:
    """The seed papers' latent-variable baselines (preset ``latents``): each model's test NLL (its bound every
    epoch, the importance-sampled estimate where it has one) next to its own paper's."""
    from fisher.priors import PRIORS, prior_location
    latents = preset.get("latents") or {}
    found = {k: latent_location(out, k, s) for k, s in latents.items()
             if exists(join(prior_location(latent_location(out, k, s)), "manifest.json"))}
    if not found:
        return []
    lines = ["## Latent-variable baselines (the seed papers' models)", "",
             "Their embedding is their own latent (PixelVAE: the posterior mean; RealNVP: f(x), all scales), decoded "
             "by their own decoder, in the same protocol as Fisher scores and activations.", "",
             "| model | architecture | epochs | test NLL bound | importance-sampled NLL | its paper |",
             "|---|---|---|---|---|---|"]
    for kind, uri in found.items():
        manifest = read_manifest(prior_location(uri), "train-prior")
        m, paper = manifest["metrics"], PAPER_LATENT_NLL.get(kind, {})
        bits = paper.get("unit") == "bits/dim"
        bound = f"{m['test_bits_per_dim']:.3f} bits/dim" if bits else f"{m['test_nll_nats']:.2f} nats/image"
        sampled = (f"{m['test_is_nll_nats']:.2f} nats/image (K = {m['is_samples']}, {m['is_images']} images; its "
                   f"bound there {m['is_bound_nll_nats']:.2f})" if "test_is_nll_nats" in m else "–")
        lines.append(f"| {PRIOR_LABELS.get(kind, kind)} (`{uri}`) | {prior_description(manifest['config'])} | "
                     f"{m['epoch']} | {bound} ({m.get('test_nll_bound') or PRIORS[kind].bound}) | {sampled} | "
                     f"{paper.get('text', '–')} {paper.get('unit', '')} |")
    lines += ["", "; ".join(f"{PRIOR_LABELS.get(k, k)}: {PAPER_LATENT_NLL[k]['source']}" for k in found
                            if k in PAPER_LATENT_NLL) + "."
              + (" The RealNVP paper's number is for 64×64 8-bit images; ours have 5 bits (and another size), so the "
                 "numbers are not comparable." if "realnvp" in found else "")
              + (" PixelVAE decodes to binary samples, which FID compares with the grey originals like every row; "
                 "the conv decoders' rows are expected (grey) images." if "pixelvae" in found else "")
              + " A bound above the independent-pixel line has learned nothing.", ""]
    return lines


def _probe_results(out: str, kinds) -> list[tuple[str, dict]]:
    return [(k, read_json(join(out, f"probe-{k}", "probe.json"), "probe result", _RERUN)) for k in kinds
            if exists(join(out, f"probe-{k}", "probe.json"))]


def probe_section(out: str, kinds: dict) -> list[str]:
    """Linear-probe accuracy and kNN agreement per embedding kind (``probe-<kind>/probe.json``)."""
    rows = _probe_results(out, kinds)
    if not rows:
        return []
    first = rows[0][1]
    target = "mean accuracy over the 40 attributes" if first["target"] == "attrs" else "digit accuracy"
    lines = ["## Semantic probes (beyond the paper)", "",
             f"Test split ({first['n_test']} images; fitted on {first['n_train']} train images). Linear probe: "
             f"closed-form ridge regression ({target}; the ridge per row, chosen on a 20% hold-out of the train "
             f"split unless fixed, is in the table); kNN: the share of each test image's {first['knn']['k']} "
             "nearest train neighbours (cosine, standardized) with its label. Sec. 5 of the paper claims that "
             "Fisher scores hold semantic information directly.", "",
             "| embedding | dims | linear probe | ridge | kNN agreement |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {r['linear_probe']['dim']} | {r['linear_probe']['accuracy']:.3f} | "
              f"{r['linear_probe'].get('ridge', '–'):g} | {r['knn']['agreement']:.3f} |" for k, r in rows]
    lines += [f"| majority label | – | {first['majority']['accuracy']:.3f} | – | – |", ""]
    return lines


def paper_fid_rows(preset: dict, prior_manifest: dict | None) -> dict | None:
    """The paper's interpolation-FID rows for this run's data, prior family and decoders: Figure 3b on MNIST,
    the prior's Figure 7 table on CelebA (the rows of the decoders the run trains)."""
    if preset["dataset"] == "mnist":
        return PAPER_MNIST_FID["rows"]
    family = _prior_name((prior_manifest or {}).get("config") or {})
    names = {d.get("decoder", "conv") for d in decoder_sections(preset).values()}
    rows = (PAPER_CELEBA_FID.get(family) or {}).get("rows", {})
    return {k: v for k, v in rows.items() if k.partition("/")[2] in names} or None


def fid_section(out: str, preset: dict, kinds: dict, suffixes, paper: dict | None = None,
                by_kind: dict | None = None) -> list[str]:
    """Interpolation FID and KID per α, mean ± spread over seeds, with the floor and the paper's rows
    (``paper``: {row label: {α: FID}}; ``by_kind``: the results, when not all under ``out``)."""
    from fisher.reports.spread import difference, spread_table
    by_kind = by_kind or {k: _fid_results(out, k, suffixes) for k in kinds}
    first = next((r[0] for r in by_kind.values() if r), None)
    if first is None:
        return []
    n, ref = first.get("pairs"), first.get("reference", "image")
    seeds = len(suffixes)
    reference = {"grey": "the grey MNIST originals (binarized MNIST is Bernoulli(grey/255), so a decoder's mean "
                         "estimates the grey image)",
                 "image": "the dataset's images as prepared"}.get(ref, ref)
    figure = "Figure 3b" if preset["dataset"] == "mnist" else "Figure 7"
    lines = [f"## Interpolation FID and KID (paper Algorithm 1, {figure})", "",
             f"N = {n} pairs per α (the paper uses 50 000); real statistics from {first['real']['count']} "
             f"{first['real']['split']} images: {reference}. Decoded images are the decoder's expected value on "
             f"[0, 1] (conv decoders) or one sample, seeded per image (RealNVP at its temperature, WGAN-GP, "
             f"PixelCNN, PixelVAE's own decoder); the pixel row is the cross-fade (1 − α) x₁ + α x₂ itself, and the "
             f"realnvp row decodes by RealNVP's exact f⁻¹, so its α = 0 cell is the floor's reconstruction. "
             + (f"Each cell: mean ± standard deviation over {seeds} seeds (decoder training and pair draw). "
                if seeds > 1 else "One seed: FID cells have no spread; KID cells show KID's standard error. ")
             + "FID is biased upwards at small N (see the floor row: real images against the same statistics); "
               "KID is unbiased at any N.", "",
             "FID:", "", spread_table(by_kind, "fid", paper), ""]
    if paper and preset["dataset"] != "mnist":
        lines += [f"The paper's rows are {PAPER_CELEBA_FID['pixelcnn']['source']}, 128×128 CelebA, N = 50 000.", ""]
    if any(r.get("kid") for rs in by_kind.values() for r in rs):
        lines += ["KID × 10³:", "", spread_table(by_kind, "kid"), ""]
    for row in by_kind:
        twin = "activation" + row[len("fisher"):]
        if row_kind(row) != "fisher" or twin not in by_kind:
            continue
        decoder = f" ({row.partition('-')[2]} decoders)" if "-" in row else ""
        for metric in ("fid", "kid"):
            diff = difference(by_kind[row], by_kind[twin], 0.5, metric)
            if diff:
                scale = 1e3 if metric == "kid" else 1
                lines += [f"At α = 0.5{decoder}, {metric.upper()}{' × 10³' if scale != 1 else ''} of Fisher scores "
                          f"minus activations: {diff['difference'] * scale:+.2f} ± {diff['stderr'] * scale:.2f} "
                          f"(standard error over {diff['n'][0]} + {diff['n'][1]} seeds; negative: Fisher scores "
                          "better).", ""]
    return lines


def report_markdown(out: str, preset: dict, kinds: dict, timings: dict, paper_preset: dict | None = None,
                    prior: str | None = None, suffixes=("",), environment: dict | None = None,
                    data: str | None = None) -> str:
    """The text of ``report.md`` for the run directory ``out``.

    ``preset``: the run's preset (with '_name'); ``kinds``: {embedding kind: (embedding dir, column)};
    ``timings``: {step: seconds}; ``paper_preset``: the paper-scale preset of the dataset, for the
    comparison paragraph (None leaves the paper's setting out of it); ``prior``: the prior the run used
    (default ``out/prior``; ``builtin:<name>``); ``suffixes``: the seeds' directory suffixes;
    ``environment``: versions, machine and wall time of the invocation that wrote the report; ``data``:
    the prepared data (default ``out/data``).
    """
    from fisher.priors import prior_location
    d = lambda *p: join(out, *p)                                            # noqa: E731
    prior, data = prior or d("prior"), data or d("data")
    prior_manifest = read_manifest(prior_location(prior), "train-prior")
    lines = [f"# Fisher-score run: preset `{preset['_name']}`", "", preset.get("description", ""), ""]
    lines += prior_section(out, preset, prior, data)
    lines += latent_section(out, preset)
    binary = int(read_manifest(data, "prepare").get("levels", 2)) == 2
    base = mean_image_baseline(data)
    if exists(d("sweep", "grid.md")):
        lines += ["## Reconstruction grid (paper Figure 3a)", "",
                  "Ours (test BCE, nats/pixel; rows = dimension, columns = density):", "",
                  demoted(read_bytes(d("sweep", "grid.md")).decode().strip()), "",
                  f"Paper ({PAPER_FIGURE_3A['source']}: their reconstruction error, same layout):", "",
                  paper_table(PAPER_FIGURE_3A), "", "![grid](sweep/grid.png)", ""]
    loss, unit = _decoder_loss(binary)
    lines += ["## Decoders (test split)", ""]
    if not binary:
        lines += [DECODER_NLL_NOTE, ""]
    lines += [f"| embedding | column | decoder | {loss} | gain from z | MSE | seeds |", "|---|---|---|---|---|---|---|"]
    for row, (_, col) in kinds.items():
        ms = [read_manifest(d(x), "train-decoder") for x in _decoder_dirs(row, suffixes) if exists(d(x, "manifest.json"))]
        if not ms:
            continue
        bce = _mean(m["metrics"].get("test_bce_nats_per_pixel") for m in ms)
        mse = _mean(m["metrics"].get("test_mse") for m in ms)
        from fisher.decoders import z_gain
        gain = _mean(z_gain(m["metrics"]) for m in ms)
        lines.append(f"| {row_kind(row)} | `{col}` | {_decoder_label(ms[0])} | {_num(bce, scale=unit)} | "
                     f"{_num(gain, scale=unit)} | {_num(mse)} | {len(ms)} |")
    if base:
        lines.append(f"| none: the train split's mean image | – | – | {base['bce_nats_per_pixel'] * unit:.4f} | – | "
                     f"{base['mse']:.4f} | – |")
        lines += ["", "The mean-image row is what a decoder that ignores its embedding can reach; a decoder is only "
                  "as useful as its distance below it. The pixel row decodes by the identity: its MSE is the distance "
                  "of the embedded reference images (MNIST: the grey originals) to the prepared ones."]
    lines += [""] + fid_section(out, preset, kinds, suffixes, paper_fid_rows(preset, prior_manifest))
    sfx0 = suffixes[0]
    lines += [f"![FID vs alpha, {k}](fid-{k}{sfx0}/fid.png)" for k in kinds if exists(d(f"fid-{k}{sfx0}", "fid.png"))]
    lines += [""] + probe_section(out, row_kinds(kinds))
    lines += ["## Interpolations (paper Figures 2 and 4)", ""]
    lines += [f"{k}:\n\n![{k}](interpolate-{k}/interpolations.png)\n" for k in kinds]
    if preset.get("edit"):
        scale = preset["edit"]["scale"]
        lines += ["## Attribute edits (paper Figure 5)", "",
                  f"Each row: a test image, then the decoded z − {scale:g}·δ, z (the reconstruction) and z + {scale:g}·δ, "
                  "with δ the difference of the attribute's train-split means in embedding space.", ""]
        lines += [f"{k}, {a}:\n\n![{k} {a}](edit-{k}/edit-{a}.png)\n" for k in kinds if row_kind(k) != "pixel"
                  for a in preset["edit"]["attributes"]]
    lines += ["## How this run compares with the paper", "", scale_note(preset, prior_manifest, paper_preset), ""]
    return "\n".join(lines + closing_section(timings, environment))


def closing_section(timings: dict, environment: dict | None) -> list[str]:
    """Timings per step, the environment, and where the rest is."""
    lines = ["## Timings (seconds, this run)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in timings.items()]
    lines += [f"| total | {round(sum(timings.values()), 1)} |"]
    if environment:
        lines += [""] + environment_section(environment, timings)
    return lines + ["", "Every directory here holds the `manifest.json` of the stage that made it; "
                        "`preset.json` is the exact configuration."]


def environment_section(env: dict, timings: dict) -> list[str]:
    """Where and with what the run ran: versions, the driver's machine, the Ray cluster, the time taken."""
    drv = env["driver"]
    lines = ["## Environment", "",
             f"- time: {round(sum(timings.values()), 1)} s of steps in all; the last invocation that ran a step "
             f"started {env['started']} and took {env['wall_seconds']} s",
             f"- driver: {drv['host']}, {drv['cpu']}, {drv['cpus']} CPUs, {drv['memory_gib']} GiB, "
             + (", ".join(drv["gpus"]) if drv["gpus"] else "no GPU") + f"; {env['platform']}"]
    if env.get("ray"):
        r = env["ray"]
        lines.append(f"- Ray cluster: {r['nodes']} node(s), {r['CPU']:g} CPUs, {r['GPU']:g} GPUs ({r['address']})")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    return lines


def write_report(out: str, preset: dict, kinds: dict, timings: dict, paper_preset: dict | None = None,
                 prior: str | None = None, suffixes=("",), environment: dict | None = None,
                 data: str | None = None) -> str:
    """Write :func:`report_markdown` to ``out/report.md``; returns its URI."""
    uri = join(out, "report.md")
    atomic_write_bytes(uri, report_markdown(out, preset, kinds, timings, paper_preset, prior, suffixes,
                                            environment, data).encode())
    return uri


def priors_report_markdown(out: str, preset: dict, runs: dict, priors: dict, timings: dict,
                           suffixes=("",), environment: dict | None = None) -> str:
    """The top ``report.md`` of a run that compares several priors (paper sec. 5.2, Figure 7: one table
    per prior). ``runs``: {label: {kind: (dir, column)}}, label "" for the steps no prior changes (the
    pixel baseline); ``priors``: {label: prior URI}. Each prior's full report is ``<label>/report.md``."""
    from fisher.priors import build_prior, prior_location
    from fisher.scores import n_features
    shared = runs.get("", {})
    lines = [f"# Fisher-score run: preset `{preset['_name']}`, {len(priors)} priors", "",
             preset.get("description", ""), "", "## Priors", "",
             "Test NLL of each prior: on its own full test split (its manifest) and on this run's test split, next "
             "to the independent-pixel model (one categorical per sub-pixel, fitted on this run's train split). A "
             "prior is only worth its distance below that line.", "",
             "| prior | architecture | free parameters | epochs | test bits/dim | this run's test nats/image | "
             "independent pixels | report |", "|---|---|---|---|---|---|---|---|"]
    manifests = {}
    for label, prior in priors.items():
        m = manifests[label] = read_manifest(prior_location(prior), "train-prior")
        b_uri = join(out, label, "baselines", "baselines.json")
        b = read_json(b_uri, "baselines record", _RERUN) if exists(b_uri) else None
        lines.append(f"| {label} | {prior_description(m['config'])} | {n_features(build_prior(_prior_name(m['config']), **m['config'].get('model', {}))):,} | "
                     f"{m['metrics']['epoch']} | {m['metrics']['test_bits_per_dim']:.3f} | "
                     + (f"{b['prior']['nll_nats']:.1f} | {b['independent_pixel']['nll_nats_per_image']:.1f}"
                        if b else "– | –") + f" | [{label}/report.md]({label}/report.md) |")
    lines += [""] + latent_section(out, preset)
    lines += ["", "## Interpolation FID per prior (paper Figure 7)", ""]
    for label in priors:
        kinds = runs[label]
        by_kind = {k: _fid_results(join(out, label), k, suffixes) for k in kinds}
        by_kind.update({k: _fid_results(out, k, suffixes) for k in shared})
        section = fid_section(join(out, label), preset, {**kinds, **shared}, suffixes,
                              paper_fid_rows(preset, manifests[label]), by_kind)
        lines += [f"### {PRIOR_LABELS.get(_prior_name(manifests[label]['config']), label)} (`{label}`)", ""]
        lines += [line for line in section[2:]] if section else ["No FID results yet.", ""]
    binary = int(read_manifest(join(out, "data"), "prepare").get("levels", 2)) == 2 \
        if exists(join(out, "data", "manifest.json")) else False
    loss, unit = _decoder_loss(binary)
    lines += ["## Decoders (test split)", ""] + ([] if binary else [DECODER_NLL_NOTE, ""])
    lines += [f"| prior | embedding | decoder | {loss} | gain from z | MSE | seeds |", "|---|---|---|---|---|---|---|"]
    for label in [*priors, ""]:
        for kind in runs.get(label, {}):
            ms = [read_manifest(join(out, label, x), "train-decoder")
                  for x in _decoder_dirs(kind, suffixes)
                  if exists(join(out, label, x, "manifest.json"))]
            if ms:
                nll = _mean(m["metrics"].get("test_bce_nats_per_pixel") for m in ms)
                mse = _mean(m["metrics"].get("test_mse") for m in ms)
                from fisher.decoders import z_gain
                gain = _mean(z_gain(m["metrics"]) for m in ms)
                lines.append(f"| {label or 'none'} | {row_kind(kind)} | {_decoder_label(ms[0])} | {_num(nll, scale=unit)} | "
                             f"{_num(gain, scale=unit)} | {_num(mse)} | {len(ms)} |")
    for label in [*priors, ""]:
        probes = _probe_results(join(out, label), row_kinds(runs.get(label, {})))
        if probes:
            lines += ["", f"Semantic probes, {f'`{label}`' if label else 'no prior'} (linear probe accuracy / kNN "
                      "agreement, test split): " + "; ".join(f"{k} {r['linear_probe']['accuracy']:.3f} / "
                                                             f"{r['knn']['agreement']:.3f}" for k, r in probes)]
    lines += ["", "## Interpolations and edits", ""]
    lines += [f"- `{label}`: " + ", ".join(f"[{k}]({label}/interpolate-{k}/interpolations.png)" for k in runs[label])
              for label in priors]
    lines += [f"- no prior: " + ", ".join(f"[{k}](interpolate-{k}/interpolations.png)" for k in shared)] if shared else []
    lines += ["", "Each prior's report has its strips, edits, probes and the comparison with the paper's setting.", ""]
    return "\n".join(lines + closing_section(timings, environment))


def write_run_reports(out: str, preset: dict, runs: dict, priors: dict, timings: dict,
                      paper_preset: dict | None = None, suffixes=("",), environment: dict | None = None) -> str:
    """``report.md`` of a run; for several priors, ``<label>/report.md`` for each and the comparison on top.
    Returns the top report's URI."""
    if list(priors) == [""]:
        return write_report(out, preset, runs[""], timings, paper_preset, priors[""], suffixes, environment)
    for label, prior in priors.items():
        own = {k[len(label) + 1:]: v for k, v in timings.items() if k.startswith(f"{label}/")}
        write_report(join(out, label), {**preset, "_name": f"{preset['_name']}, prior {label}"}, runs[label], own,
                     paper_preset, prior, suffixes, environment, data=join(out, "data"))
    uri = join(out, "report.md")
    atomic_write_bytes(uri, priors_report_markdown(out, preset, runs, priors, timings, suffixes, environment).encode())
    return uri
