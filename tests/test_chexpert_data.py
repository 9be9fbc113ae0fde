"""CheXpert reader on files in the released format: label policies, the demographics join, patient-level split."""

from __future__ import annotations

import csv
import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from vision_fixtures import CHEXPERT_RACES, write_chexpert

from dplit.callbacks import SubgroupMetrics
from dplit.data.chexpert import COMPETITION, RACES, coarse_race, read_demographics
from dplit.data.chexpert_module import CheXpertDataModule
from dplit.report.runs import load_run
from dplit.tasks import MultiLabelTask


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_chexpert(tmp_path_factory.mktemp("chexpert"))


def _rows(root, split):
    with (root / "CheXpert-v1.0-small" / f"{split}.csv").open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["Frontal/Lateral"] == "Frontal" and r["Sex"] != "Unknown"]


@pytest.mark.parametrize(("uncertain", "blank"), [("ones", "zeros"), ("zeros", "zeros"), ("ignore", "ignore")])
def test_label_policies_follow_the_csv(root, uncertain, blank):
    dm = CheXpertDataModule(root=str(root), uncertain=uncertain, blank=blank, resize=16, crop=16, val_fraction=0.2)
    splits = dm.splits()
    rows = {r["Path"].split("/", 1)[1]: r for r in _rows(root, "train")}
    mapping = {"1.0": 1.0, "0.0": 0.0, "-1.0": {"ones": 1.0, "zeros": 0.0, "ignore": -1.0}[uncertain],
               "": 0.0 if blank == "zeros" else -1.0}  # fmt: skip
    seen = 0
    for name in ("train", "val"):
        for path, y in zip(splits[name].images, splits[name].y, strict=True):
            row = rows[str(path.relative_to(root / "CheXpert-v1.0-small"))]
            assert y.tolist() == [mapping[row[label]] for label in COMPETITION]
            seen += 1
    assert seen == len(rows)  # every frontal row with a known sex, the lateral views and the Unknown-sex row out
    assert len(dm.skipped_rows) == 1 and "Unknown" in dm.skipped_rows[0]
    assert set(splits["test"].y.unique().tolist()) <= {0.0, 1.0} and len(splits["test"]) == len(_rows(root, "valid"))
    assert dm.multilabel_names == COMPETITION and dm.num_classes == 5


def test_demographics_join_and_patient_level_split(root):
    dm = CheXpertDataModule(root=str(root / "CheXpert-v1.0-small"), demographics=str(root / "CHEXPERT DEMO.csv"),
                            labels=["Edema", "No Finding"], resize=16, crop=16, val_fraction=0.25)  # fmt: skip
    assert list(dm.group_attributes) == ["sex", "age", "race"]
    splits = dm.splits()
    demo = {r["PATIENT"]: coarse_race(r["PRIMARY_RACE"]) for r in csv.DictReader((root / "CHEXPERT DEMO.csv").open())}
    patients = {}
    for name in ("train", "val", "test"):
        for path, group in zip(splits[name].images, splits[name].group, strict=True):
            pid = path.parts[-3]
            patients.setdefault(name, set()).add(pid)
            sex, band, race = group.tolist()
            assert RACES[race] == demo.get(pid, "Unknown")
            assert dm.group_attributes["sex"][sex] == ("Female", "Male")[int(pid[-5:]) % 2 == 0]
    assert not patients["train"] & patients["val"] and patients["val"]  # whole patients held out
    assert {coarse_race(r) for r in CHEXPERT_RACES} == {"White", "Black", "Asian", "Other", "Unknown"}
    assert "Unknown" in {RACES[g[2]] for g in splits["train"].group.tolist() + splits["val"].group.tolist()}
    assert read_demographics(root / "CHEXPERT DEMO.csv")["patient00001"] == "White"


def test_bad_input_names_the_field_and_the_fix(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        CheXpertDataModule().splits()
    with pytest.raises(FileNotFoundError, match="stanfordmlgroup"):
        CheXpertDataModule(root=str(tmp_path)).splits()
    with pytest.raises(ValueError, match="uncertain"):
        CheXpertDataModule(uncertain="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="findings"):
        CheXpertDataModule(labels=["Edema", "Broken Heart"])
    xlsx = tmp_path / "CHEXPERT DEMO.xlsx"
    xlsx.write_bytes(b"PK\x03\x04")
    try:
        import openpyxl  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="export it to CSV"):
            read_demographics(xlsx)
    bad = tmp_path / "demo.csv"
    bad.write_text("PATIENT,GENDER\npatient00001,Male\n")
    with pytest.raises(ValueError, match="PRIMARY_RACE"):
        read_demographics(bad)


def test_validation_logs_per_group_auc_per_finding(root, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    dm = CheXpertDataModule(root=str(root), demographics=str(root / "CHEXPERT DEMO.csv"), resize=8, crop=8,
                            batch_size=8, eval_batch_size=64, val_fraction=0.5)  # fmt: skip
    torch.manual_seed(0)
    task = MultiLabelTask(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)))
    metrics = SubgroupMetrics(wandb_panels=False)
    logger = CSVLogger(str(tmp_path), name="")
    trainer = L.Trainer(max_epochs=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[metrics], default_root_dir=str(tmp_path))  # fmt: skip
    trainer.validate(task, datamodule=dm, verbose=False)
    run = load_run(tmp_path / "version_0")  # what `dplit report` reads
    assert set(run.group_acc("val")) == {"Female", "Male"}
    assert "val/auc/group=Female" in run.evals["val"] and "val/overall_auc" in run.evals["val"]
    logged = metrics.last
    assert "val/auc/group=Female" in logged and "val/auc_gap" in logged and "val/overall_auc" in logged
    assert any(k.startswith("val/auc/label=Edema/") for k in logged)
    assert "val/auc_gap/race" in logged and "val/worst_group_auc/sex" in logged
    assert any(k.startswith("val/auc/race=") for k in logged)
