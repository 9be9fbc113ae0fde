"""The report as markdown (``report.md``) and as a flat per-group table (``groups.csv``, the W&B table)."""

from __future__ import annotations

import math
from pathlib import Path

from dplit.report.runs import Run
from dplit.report.stats import CONFIDENCE, Estimate, Summary, interpret_rho, seeds_note, size_basis
from dplit.report.twins import config_root_dir, shown, twin_config

TABLE_COLUMNS = [
    "setting",
    "epsilon",
    "group",
    "count",
    "nondp_acc",
    "nondp_acc_ci",
    "dp_acc",
    "dp_acc_ci",
    "privacy_cost",
    "privacy_cost_ci",
    "nondp_auc",
    "nondp_auc_ci",
    "dp_auc",
    "dp_auc_ci",
]


def pct(est: Estimate | None) -> str:
    """``97.12`` or ``97.12 ± 0.40`` (percent / percentage points); ``—`` when missing."""
    if est is None:
        return "—"
    if est.half is None:
        return f"{100 * est.mean:.2f}"
    return f"{100 * est.mean:.2f} ± {100 * est.half:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _cell(value: float | None) -> float | str:
    return "" if value is None else value


def _cells(est: Estimate | None) -> list[float | str]:
    return ["", ""] if est is None else [est.mean, _cell(est.half)]


def table_rows(summaries: list[Summary]) -> list[list[float | str]]:
    """One row per (DP setting, group), fractions (not percent), columns as in ``TABLE_COLUMNS``."""
    rows: list[list[float | str]] = []
    for s in summaries:
        for r in s.rows:
            rows.append(
                [s.label, _cell(s.epsilon), r.group, _cell(r.count)]
                + [v for e in (r.nondp, r.dp, r.cost, r.nondp_auc, r.dp_auc) for v in _cells(e)]
            )
    return rows


def twin_hint(dp: list[Run]) -> str:
    """How to train the non-DP twin: the twin config of the run's own config when that file exists."""
    for run in dp:
        for config in reversed(run.summary.get("config") or []):
            twin = twin_config(config)
            if twin is not None:
                root = config_root_dir(twin)
                where = f"`--baseline {root}`" if root else "`--baseline RUN_DIR` (the folder it writes)"
                return f"Train it with `dplit fit --config {shown(twin)}` and pass it with {where}."
    return (
        "Train the same config without the `DifferentialPrivacy` callback (same data, model, optimiser and epochs) "
        "and pass its run folder with `--baseline RUN_DIR`."
    )


def _label(run: Run) -> str:
    try:
        return str(run.path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(run.path)


def _runs_table(dp: list[Run], baseline: list[Run], split: str) -> list[str]:
    lines = ["| run | DP | epsilon | delta | seed | accuracy (%) |", "|---|---|---|---|---|---|"]
    for run in dp + baseline:
        acc = run.overall_acc(split)
        lines.append(
            f"| `{_label(run)}` | {'yes' if run.is_dp else 'no'} | {_num(run.epsilon, '.3g')} | "
            f"{_num(run.delta, '.3g')} | {_num(run.seed, 'd')} | {_num(None if acc is None else 100 * acc, '.2f')} |"
        )
    return lines


def _auc_lines(s: Summary, has_baseline: bool) -> list[str]:
    """The AUC gap bullet (runs that logged per-group AUC: binary and multi-label tasks), else nothing."""
    if s.auc_gap_dp is None and s.auc_gap_nondp is None:
        return []
    line = f"- **AUC gap** (max - min per-group ROC AUC): DP {pct(s.auc_gap_dp)} pp"
    if s.auc_gap_dp is not None:
        line += f" (lowest AUC: group {s.extreme_group('dp_auc', highest=False)})"
    if has_baseline:
        line += f" vs non-DP {pct(s.auc_gap_nondp)} pp"
        if s.auc_gap_nondp is not None:
            line += f" (lowest AUC: group {s.extreme_group('nondp_auc', highest=False)})"
    return [line + "."]


def _setting_section(s: Summary, has_baseline: bool) -> list[str]:
    lines = [f"## DP {s.label}" + (" vs non-DP" if has_baseline else ""), ""]
    auc = any(r.dp_auc is not None or r.nondp_auc is not None for r in s.rows)
    if has_baseline:
        extra = (" non-DP AUC (%) | DP AUC (%) |", "---|---|") if auc else ("", "")
        lines += [
            "| group | count | non-DP acc (%) | DP acc (%) | privacy cost (pp) |" + extra[0],
            "|---|---|---|---|---|" + extra[1],
        ]
        lines += [
            f"| {r.group} | {_num(r.count, '.0f')} | {pct(r.nondp)} | {pct(r.dp)} | {pct(r.cost)} |"
            + (f" {pct(r.nondp_auc)} | {pct(r.dp_auc)} |" if auc else "")
            for r in s.rows
        ]
    else:
        lines += ["| group | count | DP acc (%) |" + (" DP AUC (%) |" if auc else ""), "|---|---|---|" + "---|" * auc]
        lines += [f"| {r.group} | {_num(r.count, '.0f')} | {pct(r.dp)} |" + (f" {pct(r.dp_auc)} |" if auc else "")
                  for r in s.rows]  # fmt: skip
    lines.append("")
    worst = f"DP {pct(s.worst_dp)}% (group {s.extreme_group('dp', highest=False)})"
    if has_baseline and s.worst_nondp is not None and s.cost_gap is not None:
        rho = s.rho if s.rho is not None else math.nan
        lines += [
            f"- **Cost gap** (max - min privacy cost over groups): {100 * s.cost_gap:.2f} pp "
            f"(largest: group {s.extreme_group('cost', highest=True)}, "
            f"smallest: group {s.extreme_group('cost', highest=False)}).",
            f"- **Worst-group accuracy**: {worst} vs non-DP {pct(s.worst_nondp)}% "
            f"(group {s.extreme_group('nondp', highest=False)}).",
            f"- **Spearman rho** (non-DP group accuracy vs privacy cost, {len(s.rows)} groups): "
            f"{_num(rho, '.3f')}: {interpret_rho(rho)}.",
        ]
    else:
        lines.append(f"- **Worst-group accuracy**: {worst}.")
    return lines + _auc_lines(s, has_baseline) + [""]


def render(
    title: str,
    summaries: list[Summary],
    dp: list[Run],
    baseline: list[Run],
    split: str,
    pngs: list[Path],
) -> str:
    """The whole ``report.md``."""
    several_seeds = any(r.dp.n > 1 or (r.nondp is not None and r.nondp.n > 1) for s in summaries for r in s.rows)
    lines = [
        f"# {title}",
        "",
        f"Generated by `dplit report` from {len(dp)} DP run(s) in {len(summaries)} privacy setting(s) and "
        f"{len(baseline)} non-DP baseline run(s), on the `{split}` split ({split}/acc/group=... at the last logged "
        "epoch). Accuracies in %, privacy cost = non-DP accuracy - DP accuracy in percentage points (pp).",
        "",
    ]
    if any(s.auc_gap_dp is not None or s.auc_gap_nondp is not None for s in summaries):
        lines += [f"Per-group ROC AUC ({split}/auc/group=..., binary and multi-label tasks) in %, AUC gap = max "
                        "- min per-group AUC of a run in pp.", ""]  # fmt: skip
    if not baseline:
        lines += [
            "> **No baseline**: the privacy cost per group needs the non-DP twin of these runs. " + twin_hint(dp),
            "",
        ]
    if several_seeds:
        lines += [
            f"With several seeds, values are means and ± is the half-width of a {100 * CONFIDENCE:.0f}% confidence "
            "interval (Student t, n - 1 degrees of freedom). The privacy cost's interval pairs DP and non-DP runs by "
            "seed when both have the same seeds, and is Welch's interval otherwise (a side with a single run is "
            "taken as exact).",
            "",
        ]
    lines += ["## Runs", ""] + _runs_table(dp, baseline, split) + [""]
    for s in summaries:
        lines += _setting_section(s, bool(baseline))
    if pngs:
        lines += ["## Plots", ""]
        captions = {
            "group_accuracy": "Per-group accuracy, DP vs non-DP",
            "privacy_cost": "Privacy cost per group",
            "poor_get_poorer": f"Non-DP group accuracy vs privacy cost ({size_basis(summaries)[1]})",
            "accuracy_vs_epsilon": "Per-group accuracy vs epsilon (dashed: non-DP)",
        }
        lines += [f"Error bars: {seeds_note(summaries)}.", ""]
        for png in pngs:
            lines += [f"![{captions.get(png.stem, png.stem)}]({png.name})", ""]
    return "\n".join(lines).rstrip() + "\n"
