"""``dplit report OUT`` on a sweep folder (one holding ``sweep.json``): methods compared at equal epsilon.

Writes into ``--out`` (default ``OUT/report``): ``report.md`` (per method and epsilon: n, reached epsilon, overall,
worst-group and per-group accuracy with 95% Student t intervals across seeds; the non-DP cells as the reference;
the cells without a completed run), ``sweep_report.json`` (the same numbers), ``accuracy_vs_epsilon.png`` and
``pareto.png``. ``--baseline OTHER_SWEEP`` takes the non-DP reference from another sweep's ``nodp`` cells, for a DP
recipe whose non-DP twin differs in more than the DP callback (e.g. its learning rate).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dplit.report.markdown import pct
from dplit.report.runs import check_same_task, choose_split
from dplit.report.select import ReportError
from dplit.report.stats import CONFIDENCE
from dplit.sweep.aggregate import CellRun, Setting, aggregate, read_cells, to_json
from dplit.sweep.run import MANIFEST, read_manifest
from dplit.sweep.spec import NODP

PROG = "dplit report"
JSON_NAME = "sweep_report.json"


def is_sweep(path: Path) -> bool:
    """A folder written by ``dplit sweep`` (it holds ``sweep.json``)."""
    return (path / MANIFEST).is_file()


def _delta(value: float | None, ref: float | None) -> str:
    return "—" if value is None or ref is None else f"{100 * (value - ref):+.2f}"


def _twin_cells(sweep: Path, baseline: list[Path], cells: list[CellRun]) -> list[CellRun]:
    """The ``nodp`` cells of the ``--baseline`` sweep, this sweep's non-DP reference. Raises ``ReportError`` naming the
    fix unless ``baseline`` is one sweep folder with ``nodp`` cells and this sweep has none of its own."""
    if len(baseline) != 1 or not is_sweep(baseline[0]):
        raise ReportError(
            f"{sweep} is a sweep: --baseline takes one other sweep folder (holding sweep.json) whose `nodp` cells are "
            f"the non-DP reference, got {' '.join(map(str, baseline))}; or drop --baseline and add nodp to the "
            "sweep's grid.algorithm"
        )
    if any(c.method == NODP for c in cells):
        raise ReportError(f"{sweep} has `nodp` cells of its own, its non-DP reference: drop --baseline {baseline[0]}")
    entries = read_manifest(baseline[0]).get("cells")
    twins = [e for e in entries if e.get("method") == NODP] if isinstance(entries, list) else []
    if not twins:
        raise ReportError(f"--baseline {baseline[0]}: that sweep has no `nodp` cells (list nodp in its grid.algorithm)")
    return read_cells(baseline[0], twins)


def render(
    title: str,
    out: Path,
    settings: list[Setting],
    cells: list[CellRun],
    split: str,
    pngs: list[Path],
    reference: Path | None = None,
) -> str:
    """``report.md``: overall/worst-group table, per-group table, plots, incomplete cells. ``reference``: the sweep
    whose ``nodp`` cells are the non-DP reference, when not ``out`` itself (``--baseline``)."""
    ref = next((s for s in settings if s.is_reference), None)
    done = sum(c.run is not None for c in cells)
    lines = [f"# {title}", ""]
    lines.append(
        f"Sweep `{out}`: {len(cells)} cells, {done} completed. Metrics: the last `{split}/` evaluation of "
        f"each cell. Values in %; ± is the half-width of the {100 * CONFIDENCE:.0f}% Student t interval "
        "across seeds (scipy.stats.t), n = seeds; no interval with n = 1. DP noise is drawn from OS entropy "
        "and never seeded, so the intervals cover the noise as well as the seed (data split, init)."
    )
    if ref is None:
        lines += ["", "No completed `nodp` cell: there is no non-DP reference (add `nodp` to grid.algorithm)."]
    elif reference is not None:
        lines += ["", f"The non-DP reference is the `nodp` cells of the sweep `{reference}` (`--baseline`)."]
    if any(s.noise_multiplier is not None for s in settings):
        lines += [
            "",
            "The grid fixes the noise multiplier: epsilon is what each method reached (see `reached ε`). dplit's "
            "registered algorithms spend the same budget at the same noise multiplier (the mitigations' noisy "
            "statistics share the step's Gaussian mechanism), so they meet at equal epsilon when their runs take "
            "the same steps; a method that changes the sampling rate or the length does not. `grid.epsilon` "
            "calibrates each cell to the same target instead.",
        ]
    lines += ["", "## Overall and worst-group accuracy", ""]
    lines.append(
        "| method | target ε | σ | reached ε | n | overall acc | worst-group acc | Δ overall vs non-DP (pp) "
        "| Δ worst vs non-DP (pp) |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for s in settings:
        target = "—" if s.target_epsilon is None else f"{s.target_epsilon:g}"
        sigma = "—" if s.noise_multiplier is None else f"{s.noise_multiplier:g}"
        reached = "∞ (non-DP)" if s.is_reference else "—" if s.epsilon is None else f"{s.epsilon.mean:.3g}"
        d_all = (
            "—"
            if s.is_reference or ref is None or s.overall is None or ref.overall is None
            else _delta(s.overall.mean, ref.overall.mean)
        )
        d_worst = "—" if s.is_reference or ref is None else _delta(s.worst.mean, ref.worst.mean)
        lines.append(
            f"| {s.method} | {target} | {sigma} | {reached} | {len(s.cells)} | {pct(s.overall)} | "
            f"{pct(s.worst)} | {d_all} | {d_worst} |"
        )
    groups = list(settings[0].groups) if settings else []
    lines += ["", f"## Per-group {split} accuracy", ""]
    lines.append("| method | ε | n | " + " | ".join(f"group {g}" for g in groups) + " |")
    lines.append("|---|---|---|" + "---|" * len(groups))
    for s in settings:
        budget = "—" if s.is_reference else s.label.removeprefix(f"{s.method} ")
        lines.append(
            f"| {s.method} | {budget} | {len(s.cells)} | " + " | ".join(pct(s.groups.get(g)) for g in groups) + " |"
        )
    if pngs:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    missing = [c for c in cells if c.run is None]
    lines += ["", "## Cells without a completed run", ""]
    lines += [f"- `{c.name}`: {c.problem}" for c in missing] or ["None: every cell completed."]
    lines += ["", "## Cells", "", "| setting | cells |", "|---|---|"]
    lines += [f"| {s.label} | {', '.join(f'`{c}`' for c in s.cells)} |" for s in settings]
    return "\n".join(lines) + "\n"


def report_sweep(
    sweep: Path, dest: Path | None, split: str = "auto", title: str | None = None, baseline: list[Path] | None = None
) -> int:
    """Writes the sweep report of ``sweep`` into ``dest`` (default ``sweep/report``); returns the exit code."""
    manifest = read_manifest(sweep)
    entries = manifest.get("cells")
    if not isinstance(entries, list) or not entries:
        print(
            f"{PROG}: error: {sweep / MANIFEST}: no cells in the manifest; rerun `dplit sweep` to rewrite it",
            file=sys.stderr,
        )
        return 2
    cells = read_cells(sweep, entries)
    reference: Path | None = None
    if baseline:
        try:
            cells = _twin_cells(sweep, baseline, cells) + cells
        except ReportError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        reference = baseline[0]
    runs = [c.run for c in cells if c.run is not None]
    for cell in cells:
        if cell.run is None:
            print(f"{PROG}: warning: cell {cell.name}: {cell.problem}", file=sys.stderr)
    if not runs:
        print(f"{PROG}: error: {sweep}: no cell has a completed run yet; run `dplit sweep` first", file=sys.stderr)
        return 2
    try:
        split = choose_split(runs, split)
        check_same_task(runs, split)
    except ReportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    settings = aggregate(cells, split)
    out = dest if dest is not None else sweep / "report"
    out.mkdir(parents=True, exist_ok=True)
    from dplit.sweep import plots  # matplotlib only once the input is valid

    pngs = [plots.accuracy_vs_epsilon(settings, out / "accuracy_vs_epsilon.png", split)]
    pngs.append(plots.pareto(settings, out / "pareto.png", split))
    data = runs[0].data_class
    title = title or f"Methods at equal epsilon: {sweep.name}" + (f" ({data.rsplit('.', 1)[-1]})" if data else "")
    (out / "report.md").write_text(render(title, sweep, settings, cells, split, pngs, reference))
    (out / JSON_NAME).write_text(json.dumps(to_json(settings, cells, split), indent=2) + "\n")
    print(
        f"wrote {out / 'report.md'}, {out / JSON_NAME} and {', '.join(p.name for p in pngs)} "
        f"({len(runs)} of {len(cells)} cells completed)"
    )
    return 0


__all__ = ["JSON_NAME", "is_sweep", "render", "report_sweep"]
