"""The committed sweep specs of the MNIST moonshot (``configs/sweeps/mnist_tanh_ema*_sweep.yaml``): each one's first
seed trains through ``dplit sweep`` on real-format MNIST, with its own fit arguments (the appended EMA callback, the
epsilon the noise is calibrated to), shortened to a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from dplit.cli.main import main
from dplit.sweep.run import completed_run

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "configs" / "sweeps").glob("mnist_*_sweep.yaml"))
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1"]
TINY = ["--data.init_args.underrepresented={8: 20}", "--data.init_args.batch_size=64"]  # the fixture: 60 digits a class


def test_the_moonshot_specs_are_found():
    assert {p.name for p in SPECS} >= {"mnist_tanh_ema_sweep.yaml", "mnist_tanh_ema_nodp_sweep.yaml"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_spec_trains_its_first_seed(path, mnist_root, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the spec's config path is relative to the repository root
    spec = yaml.safe_load(path.read_text())
    assert any(a.startswith("--data.root=") for a in spec["fit_args"]), "the spec names its MNIST folder"
    spec["fit_args"] = [a for a in spec["fit_args"] if not a.startswith("--data.root=")]
    spec["fit_args"] += [f"--data.root={mnist_root}", *TINY, *FAST]
    spec["grid"]["seed"] = spec["grid"]["seed"][:1]
    spec["out"] = str(tmp_path / "sweep")
    local = tmp_path / path.name
    local.write_text(yaml.safe_dump(spec))
    assert main(["sweep", "--spec", str(local)]) == 0
    cells = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["cells"]
    assert len(cells) == len(spec["grid"]["algorithm"]) and all(c["status"] == "completed" for c in cells)
    for cell in cells:
        run = completed_run(Path(cell["dir"]))
        assert run is not None, cell
        summary = json.loads((run / "summary.json").read_text())
        state = torch.load(summary["checkpoint"], map_location="cpu", weights_only=False)
        ema = next(v for k, v in state["callbacks"].items() if k.startswith("EMAWeights"))
        assert ema["updates"] == 3, "the EMA the spec appends averaged every optimizer step"
        if cell["method"] == "nodp":
            assert summary["privacy"] is None or summary["privacy"].get("epsilon") is None
            assert "DifferentialPrivacy" not in state["callbacks"]
        else:  # calibrated to the grid's epsilon for this (shortened) run: spent up to the budget, not beyond
            epsilon = summary["privacy"]["epsilon"]
            assert cell["epsilon"] == 5.92 and 5.5 < epsilon <= 5.92, summary["privacy"]
