"""Layer subset x epsilon: which layers to fine-tune privately is a hyper-parameter (Cattan et al. 2022).

A `dplit sweep` spec varies the DP budget, the algorithm and the seed, with one set of `dplit fit` arguments for
every cell: it cannot vary ``trainable_layers`` per cell. This script runs one ordinary sweep per layer subset,
each in ``OUT/layers=<name>/`` with ``--model.init_args.backbone.init_args.trainable_layers=<value>`` appended to the
spec's ``fit_args`` (so every sub-sweep is resumable, reportable with ``dplit report``, and listed by ``--dry-run``),
then writes ``OUT/layers_table.md``: accuracy and worst-group accuracy (mean over seeds) per subset x budget.

    python scripts/sweep_layers.py --spec configs/sweeps/cifar10_layers_sweep.yaml \\
        --layers head=0 last_block=1 last_2=2 all=null --dry-run
    python scripts/sweep_layers.py --spec configs/sweeps/cifar10_layers_sweep.yaml --layers head=0 last_2=2 all=null

A value is an integer (the last k timm blocks; 0 = the head only), ``null`` (all layers) or a YAML list of module
name patterns (``'[blocks.6*, conv_head]'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from dplit.sweep.aggregate import aggregate, read_cells
from dplit.sweep.cells import expand, load_base
from dplit.sweep.local import run_sweep
from dplit.sweep.run import fit_command, read_manifest
from dplit.sweep.spec import SweepSpec, load_spec

OPTION = "--model.init_args.backbone.init_args.trainable_layers"


def parse_layers(items: list[str]) -> list[tuple[str, str]]:
    """``["head=0", "all=null"]`` -> ``[("head", "0"), ("all", "null")]``; names become folder names."""
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value or not name.replace("_", "").replace("-", "").isalnum():
            raise SystemExit(f"--layers: {item!r} must be NAME=VALUE, e.g. head=0, last_2=2, all=null, "
                             "'tail=[blocks.6*, conv_head]' (NAME: letters, digits, _ -)")  # fmt: skip
        out.append((name, value))
    return out


def sub_spec(spec: SweepSpec, name: str, value: str) -> SweepSpec:
    """The spec of one layer subset: its own output folder, ``trainable_layers`` appended to ``fit_args``."""
    return dataclasses.replace(spec, out=spec.out / f"layers={name}", fit_args=[*spec.fit_args, f"{OPTION}={value}"])


def table(spec: SweepSpec, layers: list[tuple[str, str]], split: str) -> str:
    """Markdown: one row per layer subset x setting (non-DP first), mean accuracy and worst-group accuracy."""
    lines = [f"Layer subset x budget ({split} split; mean over seeds, 95% t interval half-width when > 1 seed)", "",
             "| layers | trainable_layers | setting | epsilon reached | seeds | accuracy (%) | worst-group acc (%) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, value in layers:
        sub = sub_spec(spec, name, value)
        if not (sub.out / "sweep.json").is_file():
            lines.append(f"| {name} | `{value}` | not run | | | | |")
            continue
        cells = read_cells(sub.out, read_manifest(sub.out)["cells"])
        for s in aggregate(cells, split):

            def fmt(e):  # noqa: ANN001, ANN202
                return "" if e is None else f"{100 * e.mean:.1f}" + (f" ± {100 * e.half:.1f}" if e.n > 1 else "")

            eps = "" if s.epsilon is None else f"{s.epsilon.mean:.2f}"
            lines.append(f"| {name} | `{value}` | {s.label} | {eps} | {len(s.seeds)} | {fmt(s.overall)} | "
                         f"{fmt(s.worst)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, required=True, help="a `dplit sweep` spec (budgets, seeds, base config)")
    parser.add_argument("--layers", nargs="+", required=True, help="NAME=VALUE layer subsets, e.g. head=0 all=null")
    parser.add_argument("--split", choices=["val", "test"], default="val", help="metrics of the table")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their commands, run nothing")
    parser.add_argument("--table-only", action="store_true", help="write the table from the finished cells")
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    layers = parse_layers(args.layers)
    code = 0
    for name, value in layers:
        sub = sub_spec(spec, name, value)
        cells = expand(sub)
        if args.dry_run:
            print(f"# layers={name} (trainable_layers={value}): {len(cells)} cells in {sub.out}")
            for cell in cells:
                print("  " + fit_command(sub, cell))
            continue
        if not args.table_only:
            code = max(code, run_sweep(sub, load_base(sub), cells))
    if not args.dry_run:
        text = table(spec, layers, args.split)
        spec.out.mkdir(parents=True, exist_ok=True)
        (spec.out / "layers_table.md").write_text(text)
        print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
