"""The report's PNGs, drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dplit.report.stats import Estimate, Summary, seeds_note, size_basis

DPI = 120
NONDP_COLOR = "0.45"


def _figure(n_groups: int) -> Figure:
    fig = Figure(figsize=(max(6.0, 0.9 * n_groups + 2.5), 4.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _err(estimates: list[Estimate | None]) -> list[float] | None:
    """95% CI half-widths in percent, or None (no error bars) when no estimate has one (a single seed)."""
    halves = [100 * e.half if e is not None and e.half is not None else 0.0 for e in estimates]
    return halves if any(h > 0 for h in halves) else None


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _colors(n: int) -> list[tuple[float, float, float, float]]:
    name = "tab10" if n <= 10 else "tab20"
    return [colormaps[name](i % (10 if n <= 10 else 20)) for i in range(n)]


def group_accuracy(summaries: list[Summary], path: Path, split: str) -> Path:
    """Per-group accuracy bars: non-DP (when a baseline is given) and each DP setting, error bars = 95% CI."""
    groups = [r.group for r in summaries[0].rows]
    series: list[tuple[str, list[Estimate | None], Any]] = []
    if summaries[0].rows[0].nondp is not None:
        series.append(("non-DP", [r.nondp for r in summaries[0].rows], NONDP_COLOR))
    colors = _colors(len(summaries))
    series += [(f"DP {s.label}", [r.dp for r in s.rows], c) for s, c in zip(summaries, colors, strict=True)]
    fig = _figure(len(groups))
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    width = 0.8 / len(series)
    for i, (label, est, color) in enumerate(series):
        heights = [100 * e.mean if e is not None else 0.0 for e in est]
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar(x + offset, heights, width, yerr=_err(est), capsize=2, label=label, color=color)
    ax.set_xticks(x, groups)
    ax.set_xlabel("group")
    ax.set_ylabel(f"{split} accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Per-group {split} accuracy ({seeds_note(summaries)})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return _save(fig, path)


def privacy_cost(summaries: list[Summary], path: Path) -> Path:
    """Privacy cost (non-DP - DP accuracy, percentage points) per group, one bar series per DP setting."""
    groups = [r.group for r in summaries[0].rows]
    fig = _figure(len(groups))
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    width = 0.8 / len(summaries)
    for i, (s, color) in enumerate(zip(summaries, _colors(len(summaries)), strict=True)):
        costs = [r.cost for r in s.rows]
        heights = [100 * c.mean if c is not None else 0.0 for c in costs]
        ax.bar(
            x + (i - (len(summaries) - 1) / 2) * width,
            heights,
            width,
            yerr=_err(costs),
            capsize=2,
            label=f"DP {s.label} (gap {100 * (s.cost_gap or 0.0):.1f} pp)",
            color=color,
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, groups)
    ax.set_xlabel("group")
    ax.set_ylabel("privacy cost (pp) = non-DP - DP accuracy")
    ax.set_title(f"Privacy cost per group ({seeds_note(summaries)})")
    ax.legend(fontsize="small")
    return _save(fig, path)


def poor_get_poorer(summaries: list[Summary], path: Path) -> Path:
    """Scatter of non-DP group accuracy (x) vs privacy cost (y), point area proportional to the group's training
    examples (``size_basis``: evaluation counts only for runs that did not record them, and the title says so)."""
    fig = Figure(figsize=(6.4, 4.8), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    sizes_by_setting, size_label = size_basis(summaries)
    known = [c for sizes in sizes_by_setting for c in sizes if c is not None]
    top = max(known) if known else 1.0
    for s, color, counts in zip(summaries, _colors(len(summaries)), sizes_by_setting, strict=True):
        xs = [100 * r.nondp.mean for r in s.rows if r.nondp is not None]
        ys = [100 * r.cost.mean for r in s.rows if r.cost is not None]
        sizes = [30 + 400 * (c / top if c else 0.25) for c in counts]
        rho = s.rho if s.rho is not None else math.nan
        ax.scatter(xs, ys, s=sizes, alpha=0.6, color=color, edgecolors="black", label=f"DP {s.label}: ρ={rho:.2f}")
        for r, xv, yv in zip(s.rows, xs, ys, strict=True):
            ax.annotate(r.group, (xv, yv), textcoords="offset points", xytext=(5, 5), fontsize="small")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("non-DP group accuracy (%)")
    ax.set_ylabel("privacy cost (pp)")
    rhos = ", ".join(f"{s.label}: {s.rho if s.rho is not None else math.nan:.2f}" for s in summaries)
    only = summaries[0].rho if len(summaries) == 1 and summaries[0].rho is not None else None
    title = f"The poor get poorer? Spearman ρ = {only:.2f}" if only is not None else f"Spearman ρ: {rhos}"
    ax.set_title(f"{title}\n{size_label}; {seeds_note(summaries)}", fontsize="medium")
    if len(summaries) > 1:
        legend = ax.legend(fontsize="small")
        for handle in legend.legend_handles:
            handle.set_sizes([40])  # type: ignore[union-attr]
    return _save(fig, path)


def accuracy_vs_epsilon(summaries: list[Summary], path: Path, split: str) -> Path:
    """One line per group: DP accuracy against epsilon (log scale), the non-DP accuracy as a dashed reference."""
    points = [s for s in summaries if s.epsilon is not None]
    groups = [r.group for r in points[0].rows]
    fig = Figure(figsize=(7.0, 4.8), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    eps = [float(s.epsilon) for s in points if s.epsilon is not None]
    for i, (g, color) in enumerate(zip(groups, _colors(len(groups)), strict=True)):
        est: list[Estimate | None] = [s.rows[i].dp for s in points]
        ax.errorbar(
            eps,
            [100 * e.mean for e in est if e is not None],
            yerr=_err(est),
            marker="o",
            capsize=2,
            color=color,
            label=g,
        )
        nondp = points[0].rows[i].nondp
        if nondp is not None:
            ax.axhline(100 * nondp.mean, color=color, linestyle="--", linewidth=0.9)
    ax.set_xscale("log")
    ax.set_xticks(eps, [f"{e:.3g}" for e in eps])
    ax.minorticks_off()
    ax.set_xlabel("epsilon (log scale)")
    ax.set_ylabel(f"{split} accuracy (%)")
    reference = " (dashed: non-DP)" if points[0].rows[0].nondp is not None else ""
    ax.set_title(f"Per-group accuracy vs epsilon{reference}; {seeds_note(points)}")
    ax.legend(title="group", fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)
