"""Interpolation FID against α (paper Algorithm 1): the tables and plots of Figure 3b (MNIST) and
Figure 7 (CelebA).

A result is the content of an ``fid.json`` ({'label': 'fisher/conv', 'fid': {α: FID}, 'kid': {α: {'mean', 'std',
'stderr', 'subsets', 'subset_size'}}, 'reference': 'grey' | 'image', 'pairs': N, 'real': {'split', 'count'},
'real_floor': {..., 'fid', 'kid'} or None, 'weights_id', ...}); the paper's rows come
from :mod:`fisher.reports.paper` (:data:`~fisher.reports.paper.PAPER_MNIST_FID`,
``PAPER_CELEBA_FID[prior]``). Pure functions: results in, markdown text or PNG bytes out.
"""
from __future__ import annotations

import io
import math
import warnings



def _cell(text) -> str:
    """A label as one Markdown table cell: ``|`` escaped, line breaks as spaces."""
    return " ".join(str(text).splitlines()).replace("|", "\\|")

def _alpha_key(a: float) -> str:
    return f"{float(a):g}"


def _as_paper(paper: dict | None) -> tuple[dict, str, int | None]:
    """(rows {label: {α: FID}}, source, pairs) of a paper constant or a plain {label: {α: FID}}."""
    if not paper:
        return {}, "paper", None
    if "rows" in paper:
        return paper["rows"], paper.get("source", "paper"), paper.get("pairs")
    return paper, "paper", None


def _fid_values(result: dict) -> dict[float, float | None]:
    return {float(k): (None if v is None else float(v)) for k, v in result["fid"].items()}


def fid_table(results: list[dict], paper: dict | None = None) -> str:
    """Markdown FID-vs-α table in the layout of paper Figure 3b / Figure 7.

    ``results`` are ``fid.json`` contents ({'label': 'fisher/conv', 'fid': {α: FID}, 'pairs': N, ...});
    rows are the labels (embedding/decoder), columns the α values, then N. ``paper`` (e.g.
    :data:`~fisher.reports.paper.PAPER_MNIST_FID`, ``PAPER_CELEBA_FID['pixelcnn']`` or a plain
    {label: {α: FID}}) adds the paper's rows, marked with their source. Missing values are shown as
    "–". A result's ``real_floor`` ({'split', 'count', 'fid'}: N real images scored against the same
    statistics, the lowest FID that N can show) becomes one row with that value under every α.
    """
    rows_paper, source, paper_n = _as_paper(paper)
    values = [(r.get("label", "?"), _fid_values(r), r.get("pairs", r.get("n"))) for r in results]
    floors = {(f["split"], f["count"]): f["fid"] for r in results if (f := r.get("real_floor"))}
    values += [(f"real {split} images (floor at this N)", {a: v for a in _fid_values(results[0])}, n)
               for (split, n), v in floors.items()]
    values += [(f"{label} ({source})", {float(a): v for a, v in row.items()}, paper_n)
               for label, row in rows_paper.items()]
    alphas = sorted({a for _, row, _ in values for a in row})
    head = "| embedding / decoder | " + " | ".join(f"α = {_alpha_key(a)}" for a in alphas) + " | N pairs |"
    lines = [head, "|---" * (len(alphas) + 2) + "|"]
    for label, row, n in values:
        cells = ["–" if row.get(a) is None or not math.isfinite(row[a]) else f"{row[a]:.2f}" for a in alphas]
        lines.append(f"| {_cell(label)} | " + " | ".join(cells) + f" | {n if n is not None else '–'} |")
    return "\n".join(lines)


def _kid_cell(k: dict | None) -> str:
    if not k or k.get("mean") is None or not math.isfinite(k["mean"]):
        return "–"
    err = k.get("stderr")
    return f"{k['mean'] * 1e3:.2f}" + (f" ± {err * 1e3:.2f}" if err is not None and math.isfinite(err) else "")


def kid_table(results: list[dict]) -> str:
    """Markdown KID-vs-α table beside :func:`fid_table` (beyond the paper): KID × 10³ ± its standard error
    × 10³ (over the KID subsets), rows the labels (embedding/decoder) and each result's floor
    (``real_floor['kid']``: N real images against the same real features), columns the α values, then N and
    the subsets × subset size. Results without ``kid`` show "–"."""
    rows = [(r.get("label", "?"), {float(a): k for a, k in (r.get("kid") or {}).items()}, r.get("pairs", r.get("n")),
             r) for r in results]
    alphas = sorted({a for r in results for a in _fid_values(r)} | {a for _, row, _, _ in rows for a in row})
    floors = {}
    for r in results:
        f = r.get("real_floor")
        if f and f.get("kid"):
            floors.setdefault((f["split"], f["count"]), f["kid"])
    rows += [(f"real {split} images (floor at this N)", {a: k for a in alphas}, n, None)
             for (split, n), k in floors.items()]

    def size(row: dict) -> str:
        k = next((v for v in row.values() if v), None)
        return f"{k['subsets']} × {k['subset_size']}" if k and "subsets" in k else "–"
    head = ("| embedding / decoder | " + " | ".join(f"α = {_alpha_key(a)}" for a in alphas)
            + " | N pairs | subsets × size |")
    lines = [head, "|---" * (len(alphas) + 3) + "|"]
    for label, row, n, _ in rows:
        cells = [_kid_cell(row.get(a)) for a in alphas]
        lines.append(f"| {_cell(label)} | " + " | ".join(cells) + f" | {n if n is not None else '–'} | {size(row)} |")
    return "\n".join(lines)


def fid_markdown(result: dict, paper: dict | None = None) -> str:
    """``fid.md`` of one ``fisher evaluate`` result: the protocol in one paragraph, then :func:`fid_table`
    and, where the result has KID, :func:`kid_table`."""
    real, floor = result["real"], result.get("real_floor")
    reference = result.get("reference") or real.get("reference")
    text = (f"Interpolation FID (paper Algorithm 1; layout of Figure 3b / Figure 7): N = {result['pairs']} pairs "
            f"per α, against {real['count']} real {real['split']} images"
            + (f" ({reference} reference)" if reference else "") + f"; Inception weights {result['weights_id']}."
            + (f" Floor: {floor['count']} real {floor['split']} images score {floor['fid']:.2f} against the same "
               "statistics, the lowest value this N can show." if floor else "") + "\n\n"
            + fid_table([result], paper) + "\n")
    if result.get("kid"):
        kept = real.get("features_kept")
        text += ("\nKID × 10³ ± standard error × 10³ (Kernel Inception Distance, beyond the paper: unbiased at any N, "
                 "so ≈ 0 for real images; against "
                 + (f"{kept} of the real images' features" if kept else "the real images' features") + "):\n\n"
                 + kid_table([result]) + "\n")
    return text


def fid_plot(results: list[dict], paper: dict | None = None, title: str = "Interpolation FID") -> bytes:
    """PNG bytes: FID against α, one line per result (paper rows dashed); no global matplotlib state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows_paper, source, _ = _as_paper(paper)
    fig = Figure(figsize=(5.5, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in results:
        row = sorted((a, v) for a, v in _fid_values(r).items() if v is not None and math.isfinite(v))
        if row:
            ax.plot(*zip(*row), marker="o", label=r.get("label", "?"))
    for label, row in rows_paper.items():
        pts = sorted((float(a), v) for a, v in row.items())
        ax.plot(*zip(*pts), linestyle="--", marker="x", alpha=0.7, label=f"{label} ({source})")
    alphas = {a for r in results for a in _fid_values(r)}
    alphas = sorted(alphas | {float(a) for row in rows_paper.values() for a in row})
    if alphas:
        ax.set_xticks(alphas)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_xlabel("α (mixing coefficient)")
    ax.set_ylabel("FID")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fig.savefig(buf, format="png")
    return buf.getvalue()
