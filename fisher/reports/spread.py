"""Interpolation FID and KID with their spread over seeds (beyond the paper, which reports one run).

A run of ``fisher run`` with ``evaluate.seeds = S`` trains S decoders per embedding kind (decoder
seeds 0 … S-1) and draws S sets of pairs (pair seeds 0 … S-1), one ``fid.json`` each
(:mod:`fisher.reports.figure3b` describes its content). :func:`spread_table` shows, per kind and α,
the mean over the S results ± their sample standard deviation, so that a difference between kinds is
read against the spread of one kind. With S = 1 a KID cell shows its own standard error (over KID
subsets, :func:`fisher.fid.kid`) and an FID cell has no spread. The floor row (real images against
the same statistics) gets the same treatment. Pure functions: results in, markdown out.
"""
from __future__ import annotations

import math
import statistics


def _key(a) -> str:
    return f"{float(a):g}"


def metric_values(result: dict, metric: str) -> dict[str, float]:
    """{α key: value} of one ``fid.json`` for ``metric`` 'fid' (FID) or 'kid' (the KID mean)."""
    values = result.get(metric) or {}
    out = {}
    for a, v in values.items():
        v = v.get("mean") if isinstance(v, dict) else v
        if v is not None and math.isfinite(float(v)):
            out[_key(a)] = float(v)
    return out


def floor_value(result: dict, metric: str) -> float | None:
    floor = result.get("real_floor") or {}
    v = floor.get(metric)
    v = v.get("mean") if isinstance(v, dict) else v
    return None if v is None else float(v)


def summary(values: list[float], stderr: float | None = None) -> dict:
    """{mean, sd (sample std over seeds; the one result's stderr when there is one value), n}."""
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    sd = statistics.stdev(values) if len(values) > 1 else stderr
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


def spread(results: list[dict], metric: str) -> dict[str, dict]:
    """{α key: summary} over the seeds' results of one kind."""
    alphas = sorted({a for r in results for a in metric_values(r, metric)}, key=float)
    out = {}
    for a in alphas:
        vals = [metric_values(r, metric)[a] for r in results if a in metric_values(r, metric)]
        se = None
        if metric == "kid" and len(results) == 1:
            se = ((results[0].get("kid") or {}).get(a) or {}).get("stderr")
        out[a] = summary(vals, se)
    return out


def _cell(s: dict, scale: float) -> str:
    if s["mean"] is None:
        return "–"
    text = f"{s['mean'] * scale:.2f}"
    return text + (f" ± {s['sd'] * scale:.2f}" if s["sd"] is not None and math.isfinite(s["sd"]) else "")


def spread_table(by_kind: dict[str, list[dict]], metric: str = "fid", paper: dict | None = None) -> str:
    """Markdown table: rows = kinds (label of their first result), then the floor, then the paper's rows
    (``paper`` = {label: {α: value}}, FID only); columns = α, seeds, N pairs. KID is shown × 10³."""
    scale = 1e3 if metric == "kid" else 1.0
    rows, alphas = [], set()
    for kind, results in by_kind.items():
        if not results:
            continue
        s = spread(results, metric)
        alphas |= set(s)
        rows.append((results[0].get("label", kind), s, len(results), results[0].get("pairs")))
    # the floor is one cached measurement per (real statistics, N): identical values are counted once
    floors = sorted({v for results in by_kind.values() for r in results if (v := floor_value(r, metric)) is not None})
    first = next((r for results in by_kind.values() for r in results), None)
    if floors and first is not None:
        f = first["real_floor"]
        s = summary(floors)
        rows.append((f"real {f['split']} images (floor at this N)", {a: s for a in alphas}, len(floors),
                     f.get("count")))
    for label, row in (paper or {}).items():
        rows.append((f"{label} (paper)", {_key(a): {"mean": v, "sd": None, "n": 1} for a, v in row.items()}, 1,
                     50000))
    alphas = sorted(alphas, key=float)
    head = "| embedding / decoder | " + " | ".join(f"α = {a}" for a in alphas) + " | seeds | N pairs |"
    lines = [head, "|---" * (len(alphas) + 3) + "|"]
    for label, s, n, pairs in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(s.get(a, {"mean": None}), scale) for a in alphas)
                     + f" | {n} | {pairs if pairs is not None else '–'} |")
    return "\n".join(lines)


def difference(a: list[dict], b: list[dict], alpha: float, metric: str = "fid") -> dict | None:
    """mean(a) − mean(b) at ``alpha`` with the standard error of that difference (sample variances over
    seeds / n, added); None when either side lacks the value or has a single seed."""
    key = _key(alpha)
    va = [metric_values(r, metric)[key] for r in a if key in metric_values(r, metric)]
    vb = [metric_values(r, metric)[key] for r in b if key in metric_values(r, metric)]
    if len(va) < 2 or len(vb) < 2:
        return None
    se = math.sqrt(statistics.variance(va) / len(va) + statistics.variance(vb) / len(vb))
    return {"difference": statistics.fmean(va) - statistics.fmean(vb), "stderr": se, "n": (len(va), len(vb))}
