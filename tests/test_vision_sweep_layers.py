"""scripts/sweep_layers.py: one ordinary sweep per layer subset, trainable_layers appended to every cell's command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import sweep_layers  # noqa: E402

SPEC = ROOT / "configs" / "sweeps" / "cifar10_layers_sweep.yaml"


def test_dry_run_lists_every_subset_with_its_override(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert sweep_layers.main(["--spec", str(SPEC), "--layers", "head=0", "all=null", "tail=[blocks.6*]",
                              "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    for name, value in (("head", "0"), ("all", "null"), ("tail", "[blocks.6*]")):
        block = out.split(f"# layers={name} ")[1].split("# layers=")[0]
        commands = [line for line in block.splitlines() if line.startswith("  dplit fit")]
        assert len(commands) == 6  # (eps 2, eps 8, non-DP) x 2 seeds
        assert all(f"layers={name}/" in c and c.rstrip("'").endswith(f"{sweep_layers.OPTION}={value}")
                   for c in commands)  # fmt: skip
    assert not (ROOT / "runs" / "sweeps" / "cifar10_layers" / "layers=head" / "sweep.json").exists()


def test_table_marks_subsets_not_run_and_bad_names_fail(tmp_path):
    spec = sweep_layers.load_spec(SPEC)
    spec = sweep_layers.dataclasses.replace(spec, out=tmp_path)
    text = sweep_layers.table(spec, [("head", "0")], "val")
    assert "| head | `0` | not run |" in text
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        sweep_layers.parse_layers(["head"])
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        sweep_layers.parse_layers(["a/b=0"])


def test_command_line_strings_for_trainable_layers():
    """`--...trainable_layers=null` reaches TimmBackbone as the string 'None': read as all layers, digits as k."""
    from dplit.models import TimmBackbone

    every = TimmBackbone(name="test_efficientnet", num_classes=3, trainable_layers=None).trainable
    assert TimmBackbone(name="test_efficientnet", num_classes=3, trainable_layers="None").trainable == every
    head = TimmBackbone(name="test_efficientnet", num_classes=3, trainable_layers="0").trainable
    assert head == TimmBackbone(name="test_efficientnet", num_classes=3, trainable_layers=0).trainable
    assert head and all(n.startswith("classifier") for n in head) and len(head) < len(every)
    one = TimmBackbone(name="test_efficientnet", num_classes=3, trainable_layers="conv_head").trainable
    assert {n.split(".")[0] for n in one} == {"conv_head", "classifier"}
