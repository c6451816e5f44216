"""Mean ± std over seeds, the one way every harness reports repeated runs.

A harness runs once per seed (``--seeds 0 1 2``), collects one result dict per run, and calls
:func:`summarize_runs`: every numeric leaf present in all runs becomes ``{"mean", "std", "n", "values"}`` (sample
standard deviation, ``ddof=1``; 0 for a single run); non-numeric leaves are kept when all runs agree.
:func:`format_mean_std` prints a cell, and accepts a plain number too, so one table code serves one run or many.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

__all__ = ["mean_std", "summarize_runs", "format_mean_std", "is_summary", "add_seeds_argument", "runs_table"]


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for one value) of ``values``."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def is_summary(v) -> bool:
    """Whether ``v`` is one summarised leaf of :func:`summarize_runs`."""
    return isinstance(v, Mapping) and {"mean", "std", "n", "values"} <= set(v)


def summarize_runs(runs: Sequence[Mapping]) -> dict:
    """One dict with the structure of each run in ``runs``: numeric leaves become ``{"mean", "std", "n", "values"}``.

    Keys missing from some run, and non-numeric leaves that differ between runs, are left out."""
    runs = list(runs)
    if not runs:
        raise ValueError("summarize_runs needs at least one run")
    if not all(isinstance(r, Mapping) for r in runs):
        raise ValueError("summarize_runs needs one dict per run")
    out = {}
    for key in runs[0]:
        if not all(key in r for r in runs):
            continue
        vals = [r[key] for r in runs]
        if all(_is_number(v) for v in vals):
            m, s = mean_std(vals)
            out[key] = {"mean": m, "std": s, "n": len(vals), "values": [float(v) for v in vals]}
        elif all(isinstance(v, Mapping) for v in vals):
            sub = summarize_runs(vals)
            if sub:
                out[key] = sub
        elif all(v == vals[0] for v in vals[1:]):
            out[key] = vals[0]
    return out


def format_mean_std(value, digits: int = 3, sep: str = " ± ") -> str:
    """``"m ± s"`` for a summarised leaf (``"m"`` when it holds one run), the number itself for a plain number."""
    if is_summary(value):
        if value["n"] == 1:
            return f"{value['mean']:.{digits}f}"
        return f"{value['mean']:.{digits}f}{sep}{value['std']:.{digits}f}"
    if _is_number(value):
        return f"{float(value):.{digits}f}"
    if isinstance(value, Sequence) and not isinstance(value, str) and value and all(_is_number(v) for v in value):
        return format_mean_std({"mean": mean_std(value)[0], "std": mean_std(value)[1], "n": len(value),
                                "values": list(value)}, digits, sep)
    return "-" if value is None else str(value)


def runs_table(rows: Mapping[str, Sequence[Mapping]], groups: Sequence[str], metrics: Sequence[str], *,
               group_header: str = "group", group_label: Callable[[str], str] | None = None, digits: int = 3) -> str:
    """A markdown table with one row per (method, group) and one column per metric, each cell mean ± std over runs.

    ``rows[method]`` holds one result dict per run (seed), in which ``run[group][metric]`` is a number.
    ``group_label`` names a group in the table (default: the group itself)."""
    if not metrics:
        raise ValueError("runs_table needs at least one metric")
    label = group_label or str
    lines = [f"| method | {group_header} | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 2)]
    for method, runs in rows.items():
        if not runs:
            raise ValueError(f"runs_table: method {method!r} has no runs")
        for g in groups:
            cells = [format_mean_std([r[g][k] for r in runs], digits) for k in metrics]
            lines.append(f"| {method} | {label(g)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_seeds_argument(parser, default: Sequence[int] = (0,), help: str | None = None) -> None:
    """``--seeds 0 1 2``: the seeds a harness repeats its runs over (tables print mean ± std)."""
    parser.add_argument("--seeds", type=int, nargs="+", default=list(default),
                        help=help or "seeds to repeat the runs over; tables print mean ± std (sample std)")
