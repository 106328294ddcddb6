"""Paper sec. 5.1, Figure 3a: reconstruction error by projection density × dimension.

The grid's layout is the paper's: rows are projection dimensions, columns projection densities.
``grid`` is a search space as :func:`tune_spaces.load_grid` returns it ({'density': [...],
'dim': [...]}, a density of None meaning 1/sqrt(n)); ``records`` are the sweep's cell records
(dicts with 'dim', 'density' and metrics such as 'test_bce_nats_per_pixel', 'test_mse',
'n_train', 'n_test'). Everything here is a pure function: records in, markdown text or PNG bytes out.
"""
from __future__ import annotations

import io
import math

from fisher.reports.paper import PAPER_FIGURE_3A

PANELS = {"test_bce_nats_per_pixel": ("Test BCE (nats per pixel)", "test BCE (nats/pixel)"),
          "test_mse": ("Test MSE (pixels on [0, 1])", "test MSE")}     # metric → (table heading, plot title)


def density_label(d) -> str:
    """0.01 → '0.01', 1.0 → '1', None (1/sqrt(n)) → 'auto'."""
    return "auto" if d is None else f"{d:g}"


def matrix(grid: dict, records: list[dict], key: str) -> list[list[float]]:
    """values[i][j] of metric ``key`` for dim ``grid['dim'][i]`` and density ``grid['density'][j]`` (NaN if absent)."""
    by = {(r["dim"], r["density"]): r.get(key, math.nan) for r in records}
    return [[float(by.get((dim, dens), math.nan)) for dens in grid["density"]] for dim in grid["dim"]]


def grid_table(grid: dict, values: list[list[float]], digits: int = 4) -> str:
    """Markdown table in the paper's layout: one row per dimension, one column per density."""
    head = "| dim \\ density | " + " | ".join(density_label(d) for d in grid["density"]) + " |"
    rows = [head, "|---:|" + "---:|" * len(grid["density"])]
    for dim, row in zip(grid["dim"], values):
        rows.append(f"| {dim} | " + " | ".join(f"{v:.{digits}f}" for v in row) + " |")
    return "\n".join(rows)


def paper_table(paper: dict = PAPER_FIGURE_3A) -> str:
    """The paper's Figure 3a (:data:`fisher.reports.paper.PAPER_FIGURE_3A`) in the same layout, 3 decimals."""
    return grid_table(paper, [list(paper["values"][dim]) for dim in paper["dim"]], digits=3)


def grid_markdown(grid: dict, records: list[dict], plan: dict, prior: str = "", data: str = "") -> str:
    """The sweep's ``grid.md``: what was trained, then the test BCE and MSE tables.

    ``plan`` is the sweep's plan ({'kind', 'seed', 'decoder': {'decoder', 'epochs', 'batch_size', 'lr',
    'seed'}}); ``prior`` and ``data`` name the input directories.
    """
    r0, d = records[0], plan["decoder"]
    kind = "Fisher scores" if plan["kind"] == "fisher" else "activation baseline"
    lines = ["# Reconstruction error by projection density × dimension (paper Figure 3a)", "",
             f"Embeddings: {plan['kind']} ({kind}), projection seed {plan['seed']}; prior `{prior}`, data `{data}`.",
             (f"Decoder: {d['decoder']}, {d['epochs']} epoch(s), batch {d['batch_size']}, lr {d['lr']:g}, "
              f"seed {d['seed']}; trained on {r0['n_train']} train images, evaluated on {r0['n_test']} test images."),
             "Rows: projection dimension; columns: projection density. Lower is better.", ""]
    for key, (heading, _) in PANELS.items():
        lines += [f"## {heading}", "", grid_table(grid, matrix(grid, records, key)), ""]
    return "\n".join(lines)


def grid_png(grid: dict, records: list[dict]) -> bytes:
    """The sweep's ``grid.png``: test BCE and MSE as annotated heat-maps side by side."""
    return heatmap_png(grid, {title: matrix(grid, records, key) for key, (_, title) in PANELS.items()})


def heatmap_png(grid: dict, panels: dict[str, list[list[float]]]) -> bytes:
    """Annotated heat-maps (rows: dim, columns: density) as PNG bytes; no global matplotlib state."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols, rows = len(grid["density"]), len(grid["dim"])
    fig = Figure(figsize=(1.6 + 1.3 * cols * len(panels), 1.2 + 0.8 * rows), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, values) in zip(axes, panels.items()):
        v = np.asarray(values, dtype=float)
        im = ax.imshow(v, cmap="viridis_r", aspect="auto")
        ax.set_xticks(range(cols), [density_label(d) for d in grid["density"]])
        ax.set_yticks(range(rows), [str(d) for d in grid["dim"]])
        ax.set_xlabel("projection density")
        ax.set_ylabel("projection dimension")
        ax.set_title(title)
        finite = v[np.isfinite(v)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, f"{v[i, j]:.4f}", ha="center", va="center", fontsize=8,
                        color="white" if np.isfinite(v[i, j]) and v[i, j] > mid else "black")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
