"""The sweep report's PNGs (matplotlib object API on the Agg canvas, as ``dplit.report.plots``).

``accuracy_vs_epsilon``: one panel for overall accuracy, one for worst-group accuracy, one per group; one line per
method, the non-DP reference as a dashed line with its interval as a band. ``pareto``: overall accuracy (x) against
worst-group accuracy (y), one marker shape per method and one colour per epsilon, so methods compare at equal
epsilon; error bars are the intervals across seeds.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from dplit.report.stats import Estimate
from dplit.sweep.aggregate import Setting

DPI = 110
MARKERS = "os^Dv<>pPXh*"


def _pct(e: Estimate | None) -> float:
    return 100 * e.mean if e is not None else math.nan


def _half(e: Estimate | None) -> float:
    return 100 * e.half if e is not None and e.half is not None else 0.0


def _note(settings: list[Setting]) -> str:
    ns = sorted({len(s.cells) for s in settings})
    if not ns or ns[-1] <= 1:
        return "1 seed: no intervals"
    seeds = f"{ns[0]}-{ns[-1]}" if len(ns) > 1 else str(ns[0])
    return f"n={seeds} seeds, bars: 95% t interval"


def _clamp(ax, axis: str = "y") -> None:
    """Keep the view on possible accuracies: t intervals of few seeds can reach past 0% and 100%."""
    get, set_ = (ax.get_ylim, ax.set_ylim) if axis == "y" else (ax.get_xlim, ax.set_xlim)
    lo, hi = get()
    set_(max(lo, -3.0), min(hi, 103.0))


def _methods(settings: list[Setting]) -> list[str]:
    return list(dict.fromkeys(s.method for s in settings if not s.is_reference))


def accuracy_vs_epsilon(settings: list[Setting], path: Path, split: str) -> Path:
    """Accuracy against epsilon (log scale), one panel per metric: overall, worst group, then each group."""
    dp = [s for s in settings if not s.is_reference and s.x is not None]
    ref = next((s for s in settings if s.is_reference), None)
    groups = list((dp or settings)[0].groups)
    panels: list[tuple[str, object]] = [("overall", "overall"), ("worst group", "worst")]
    panels += [(f"group {g}", g) for g in groups]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.4 * ncols + 1.6, 2.8 * nrows + 0.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    colors = colormaps["tab10"]
    methods = _methods(settings)
    xs = sorted({float(s.x) for s in dp if s.x is not None})

    def value(s: Setting, key: object) -> Estimate | None:
        return s.overall if key == "overall" else s.worst if key == "worst" else s.groups.get(str(key))

    for i, (title, key) in enumerate(panels):
        ax = axes[i // ncols][i % ncols]
        if ref is not None and (r := value(ref, key)) is not None:
            ax.axhline(_pct(r), color="black", linestyle="--", linewidth=1.0)
            if r.half:
                ax.axhspan(_pct(r) - _half(r), _pct(r) + _half(r), color="black", alpha=0.08, linewidth=0)
        for m, method in enumerate(methods):
            points = sorted((s for s in dp if s.method == method), key=lambda s: float(s.x or 0))
            est = [value(s, key) for s in points]
            dodge = 1 + 0.04 * (m - (len(methods) - 1) / 2)  # side by side at equal epsilon (log axis)
            ax.errorbar(
                [float(s.x or 0) * dodge for s in points],
                [_pct(e) for e in est],
                yerr=[_half(e) for e in est],
                marker=MARKERS[m % len(MARKERS)],
                color=colors(m % 10),
                capsize=2,
                linewidth=1.2,
            )
        ax.set_title(title, fontsize="medium")
        _clamp(ax)
        if xs:
            ax.set_xscale("log")
            ax.set_xticks(xs, [f"{x:.3g}" for x in xs])
            ax.minorticks_off()
        if i % ncols == 0:
            ax.set_ylabel(f"{split} accuracy (%)")
        if i // ncols == nrows - 1 or i + ncols >= len(panels):
            ax.set_xlabel("epsilon")
    for j in range(len(panels), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    handles = [
        Line2D([], [], color=colors(m % 10), marker=MARKERS[m % len(MARKERS)], label=method)
        for m, method in enumerate(methods)
    ]
    if ref is not None:
        handles.append(Line2D([], [], color="black", linestyle="--", label="non-DP (band: interval)"))
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", title="method")
    fig.suptitle(f"{split} accuracy vs epsilon per group ({_note(settings)})")
    fig.savefig(path, format="png")
    return path


def pareto(settings: list[Setting], path: Path, split: str) -> Path:
    """Overall (x) vs worst-group (y) accuracy: marker = method, colour = epsilon, error bars across seeds."""
    dp = [s for s in settings if not s.is_reference]
    ref = next((s for s in settings if s.is_reference), None)
    fig = Figure(figsize=(7.6, 5.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    methods = _methods(settings)
    budgets = sorted({round(float(s.x), 6) for s in dp if s.x is not None})
    cmap = colormaps["viridis"]

    def color(s: Setting) -> tuple[float, float, float, float]:
        if s.x is None or len(budgets) < 2:
            return cmap(0.4)
        return cmap(0.9 * budgets.index(round(float(s.x), 6)) / (len(budgets) - 1))

    for m, method in enumerate(methods):
        points = sorted((s for s in dp if s.method == method), key=lambda s: float(s.x or 0))
        ax.plot(
            [_pct(s.overall) for s in points], [_pct(s.worst) for s in points], color="0.6", linewidth=0.8, zorder=1
        )
        for s in points:
            ax.errorbar(
                _pct(s.overall),
                _pct(s.worst),
                xerr=_half(s.overall),
                yerr=_half(s.worst),
                marker=MARKERS[m % len(MARKERS)],
                markersize=8,
                color=color(s),
                ecolor=color(s),
                markeredgecolor="black",
                capsize=2,
                linestyle="none",
                zorder=2,
            )
            if s.x is not None:
                ax.annotate(
                    f"ε={s.x:.3g}",
                    (_pct(s.overall), _pct(s.worst)),
                    textcoords="offset points",
                    xytext=(6, 4),
                    fontsize="x-small",
                )
    if ref is not None:
        ax.errorbar(
            _pct(ref.overall),
            _pct(ref.worst),
            xerr=_half(ref.overall),
            yerr=_half(ref.worst),
            marker="*",
            markersize=14,
            color="black",
            capsize=2,
            linestyle="none",
            zorder=3,
        )
        ax.annotate(
            "non-DP",
            (_pct(ref.overall), _pct(ref.worst)),
            textcoords="offset points",
            xytext=(8, -10),
            fontsize="small",
        )
    handles = [
        Line2D(
            [],
            [],
            color="0.5",
            markeredgecolor="black",
            marker=MARKERS[m % len(MARKERS)],
            linestyle="none",
            markersize=8,
            label=method,
        )
        for m, method in enumerate(methods)
    ]
    if ref is not None:
        handles.append(Line2D([], [], color="black", marker="*", linestyle="none", markersize=12, label="non-DP"))
    handles += [
        Line2D([], [], color=cmap(0.9 * i / max(1, len(budgets) - 1)), marker="s", linestyle="none", label=f"ε={b:.3g}")
        for i, b in enumerate(budgets)
    ]
    ax.legend(handles=handles, loc="best", fontsize="small")
    _clamp(ax, "x")
    _clamp(ax, "y")
    ax.set_xlabel(f"overall {split} accuracy (%)")
    ax.set_ylabel(f"worst-group {split} accuracy (%)")
    ax.set_title(f"Overall vs worst-group accuracy at equal epsilon ({_note(settings)})", fontsize="medium")
    ax.grid(alpha=0.3)
    fig.savefig(path, format="png")
    return path


__all__ = ["accuracy_vs_epsilon", "pareto"]
