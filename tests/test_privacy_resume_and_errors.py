"""Resume continues the accountant; bad setups fail early with a message naming the field and the fix."""

from __future__ import annotations

import json

import dp_accounting
import lightning as L
import pytest
import torch
from dp_helpers import TinyData, run_job, tiny_task, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from dplit.callbacks import DifferentialPrivacy
from dplit.privacy.accounting import UnreachableEpsilonError
from dplit.privacy.compat import IncompatibleModelError
from dplit.privacy.config import PrivacyConfigError
from dplit.tasks import ClassificationTask


def rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def _fit_with_checkpoint(tmp_path, dp, epochs, ckpt_path=None):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    t = trainer(tmp_path, [dp, ckpt], max_epochs=epochs, enable_checkpointing=True)
    t.fit(tiny_task(), datamodule=TinyData(), ckpt_path=ckpt_path)
    return t, tmp_path / "ckpt" / "last.ckpt"


def test_resume_continues_the_accountant_exactly(tmp_path):
    dp1 = DifferentialPrivacy(noise_multiplier=1.0, delta=1e-3)
    _, last = _fit_with_checkpoint(tmp_path, dp1, epochs=2)
    assert dp1.accountant.steps == 20
    dp2 = DifferentialPrivacy(noise_multiplier=1.0, delta=1e-3)
    _fit_with_checkpoint(tmp_path, dp2, epochs=4, ckpt_path=last)
    assert dp2.accountant.steps == 40
    assert dp2.epsilon == pytest.approx(rdp_epsilon(0.1, 1.0, 40, 1e-3), rel=0.01)
    uninterrupted = DifferentialPrivacy(noise_multiplier=1.0, delta=1e-3)
    _fit_with_checkpoint(tmp_path / "u", uninterrupted, epochs=4)
    assert dp2.accountant.state_dict()["history"] == uninterrupted.accountant.state_dict()["history"]
    assert dp2.epsilon == uninterrupted.epsilon


@pytest.mark.parametrize(
    "changed", [{"noise_multiplier": 1.5}, {"max_grad_norm": 0.5}, {"delta": 1e-4}, {"accountant": "prv"}]
)
def test_resume_with_changed_privacy_config_is_refused(tmp_path, changed):
    _, last = _fit_with_checkpoint(tmp_path, DifferentialPrivacy(noise_multiplier=1.0, delta=1e-3), epochs=1)
    kwargs = {"noise_multiplier": 1.0, "delta": 1e-3} | changed
    before = last.read_bytes()
    with pytest.raises(PrivacyConfigError, match="different privacy configuration"):
        _fit_with_checkpoint(tmp_path, DifferentialPrivacy(**kwargs), epochs=2, ckpt_path=last)
    assert last.read_bytes() == before  # the checkpoint is untouched: nothing lost


def test_resume_with_changed_dataset_size_is_refused(tmp_path):
    _, last = _fit_with_checkpoint(tmp_path, DifferentialPrivacy(noise_multiplier=1.0), epochs=1)
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    t = trainer(tmp_path, [dp], max_epochs=2)
    with pytest.raises(PrivacyConfigError, match="different privacy configuration"):
        t.fit(tiny_task(), datamodule=TinyData(n=300), ckpt_path=last)


class PhysicalBatches(L.Callback):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.append(len(batch[1]))


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
def test_virtual_steps_match_the_logical_batch(tmp_path, mode):
    """max_physical_batch_size splits a batch into physical ones; same accountant steps, same update."""
    runs, physical = {}, {}
    for name, phys in (("full", None), ("split", 3)):
        torch.manual_seed(0)
        dp = DifferentialPrivacy(
            noise_multiplier=1e-9,
            max_grad_norm=0.05,
            max_physical_batch_size=phys,
            insecure_testing_seed=1,
            grad_sample_mode=mode,
        )
        task = tiny_task()
        physical[name] = PhysicalBatches()
        t = trainer(tmp_path, [dp, physical[name]], max_epochs=1)
        t.fit(task, datamodule=TinyData())
        runs[name] = (dp.accountant.steps, torch.nn.utils.parameters_to_vector(task.parameters()).detach())
    assert runs["full"][0] == runs["split"][0] == 10
    split, full = physical["split"].sizes, physical["full"].sizes
    assert max(split) <= 3 and len(split) > 10 and len(full) == 10  # really split into physical batches...
    assert sum(split) == sum(full)  # ...of the same Poisson draws (same testing seed), every row once
    torch.testing.assert_close(runs["full"][1], runs["split"][1], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ bad input


def test_noise_and_target_both_or_neither():
    with pytest.raises(PrivacyConfigError, match="exactly one of `noise_multiplier` and `target_epsilon`"):
        DifferentialPrivacy()
    with pytest.raises(PrivacyConfigError, match="exactly one of `noise_multiplier` and `target_epsilon`"):
        DifferentialPrivacy(noise_multiplier=1.0, target_epsilon=3.0)
    with pytest.raises(PrivacyConfigError, match="ghost.*flat"):
        DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="ghost", clipping="per_layer")


def test_unreachable_target_epsilon_says_what_is_reachable(tmp_path):
    t = trainer(tmp_path, [DifferentialPrivacy(target_epsilon=1e-4, delta=1e-3)], max_epochs=50)
    with pytest.raises(UnreachableEpsilonError, match=r"reachable"):
        t.fit(tiny_task(), datamodule=TinyData())


class BNTask(ClassificationTask):
    def __init__(self):
        super().__init__(nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)))


def test_batchnorm_is_refused_with_the_fix(tmp_path):
    t = trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=1.0)], max_steps=2)
    with pytest.raises(IncompatibleModelError, match="replace_batchnorm: true"):
        t.fit(BNTask(), datamodule=TinyData())


def test_batchnorm_fix_swaps_in_groupnorm(tmp_path):
    task = BNTask()
    t = trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=1.0, replace_batchnorm=True)], max_steps=2)
    t.fit(task, datamodule=TinyData())
    assert isinstance(task.backbone[1], nn.GroupNorm)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in task.modules())


def test_frozen_batchnorm_is_refused_too(tmp_path):
    task = BNTask()
    task.backbone[1].requires_grad_(False)  # still mixes examples through batch statistics in train mode
    t = trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=1.0)], max_steps=2)
    with pytest.raises(IncompatibleModelError, match="BatchNorm"):
        t.fit(task, datamodule=TinyData())


class TwoOptimizers(ClassificationTask):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.backbone[0].parameters(), lr=0.1), torch.optim.SGD(self.backbone[2].parameters())]


def test_two_optimizers_under_manual_optimization_are_refused(tmp_path):
    """Lightning itself refuses several optimizers under automatic optimization; manual optimization (which it
    allows) would bypass the DP optimizer's step discipline, and dplit refuses it before any step."""
    task = TwoOptimizers(tiny_task().backbone)
    task.automatic_optimization = False
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    t = trainer(tmp_path, [dp], max_steps=2)
    with pytest.raises(PrivacyConfigError, match="automatic optimization only"):
        t.fit(task, datamodule=TinyData())
    assert dp.accountant is None


def test_gradient_accumulation_is_refused(tmp_path):
    t = trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=1.0)], max_steps=2, accumulate_grad_batches=2)
    with pytest.raises(PrivacyConfigError, match="max_physical_batch_size"):
        t.fit(tiny_task(), datamodule=TinyData())


def test_loaders_passed_to_fit_are_refused(tmp_path):
    t = trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=1.0)], max_steps=2)
    with pytest.raises(PrivacyConfigError, match="datamodule"):
        t.fit(tiny_task(), train_dataloaders=TinyData().train_dataloader())


def test_budget_below_one_step_is_refused(tmp_path):
    t = trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=0.5, max_epsilon=1e-3, delta=1e-3)], max_steps=2)
    with pytest.raises(PrivacyConfigError, match="single step"):
        t.fit(tiny_task(), datamodule=TinyData())


def test_delta_not_below_one_over_n_warns(tmp_path):
    t = trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=1.0, delta=0.01)], max_steps=1)
    with pytest.warns(UserWarning, match="not below 1/N"):
        t.fit(tiny_task(), datamodule=TinyData())


def test_target_epsilon_needs_a_planned_length(tmp_path):
    t = trainer(
        tmp_path, [DifferentialPrivacy(target_epsilon=3.0)], max_epochs=-1, max_steps=-1, max_time="00:00:00:05"
    )
    with pytest.raises(PrivacyConfigError, match="max_epochs"):
        t.fit(tiny_task(), datamodule=TinyData())


def test_no_poisson_reports_the_no_amplification_bound(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, poisson_sampling=False, delta=1e-3)
    t = trainer(tmp_path, [dp], max_epochs=2)
    t.fit(tiny_task(), datamodule=TinyData())
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(1.0), 2)  # one full-batch Gaussian mechanism per epoch
    assert dp.epsilon == pytest.approx(acc.get_epsilon(1e-3), rel=0.01)
    assert dp.epsilon > rdp_epsilon(0.1, 1.0, 20, 1e-3)


def test_kill_9_between_checkpoints_still_counts_every_step(tmp_path):
    """A run SIGKILLed mid-epoch took 5 steps its last checkpoint does not know; the resume counts them."""
    import json
    from pathlib import Path

    run_job("crash_job.py", [str(tmp_path)], returncode=-9)  # SIGKILL
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=True)  # the checkpoint is intact
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("DifferentialPrivacy"))
    assert sum(n for _, _, n in saved["accountant"]["history"]) == 10  # epoch 0 only
    ledger = json.loads(Path(saved["ledger_path"]).read_text())  # never half-written
    assert sum(n for _, _, n in ledger["accountant"]["history"]) == 15  # epoch 0 + 5 steps of epoch 1
    assert not list(Path(saved["ledger_path"]).parent.glob(".privacy_ledger.json.*.tmp"))

    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=1e-3)
    t = trainer(tmp_path, [dp], max_epochs=3)
    t.fit(tiny_task(), datamodule=TinyData(), ckpt_path=last)
    assert dp.accountant.steps == 15 + 20  # the 5 lost steps are counted, then epochs 1 and 2 again
    assert dp.epsilon == pytest.approx(rdp_epsilon(0.1, 1.0, 35, 1e-3), rel=0.01)


def test_ledger_of_another_run_is_ignored(tmp_path):
    from dplit.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger(tmp_path / "l.json", run_id="a")
    ledger.write("fp", {"history": [[1.0, 0.1, 7]]})
    assert PrivacyLedger(tmp_path / "l.json", run_id="a").read("fp") == {"history": [[1.0, 0.1, 7]]}
    assert PrivacyLedger(tmp_path / "l.json", run_id="b").read("fp") is None
    assert PrivacyLedger(tmp_path / "l.json", run_id="a").read("other-config") is None


def test_disk_full_stops_cleanly_and_keeps_checkpoints_valid(tmp_path, monkeypatch):
    """A full disk while writing the ledger or a checkpoint: a clear error, and the earlier checkpoint resumes."""
    import errno

    from dplit.privacy import ledger as ledger_module

    ckpt_dir = tmp_path / "ckpt"
    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=1e-3)
    calls = {"n": 0}
    real_dump = ledger_module.json.dump

    def dump_until_full(obj, handle):
        calls["n"] += 1
        if calls["n"] > 15:  # the disk fills up in the middle of the second epoch
            raise OSError(errno.ENOSPC, "No space left on device")
        real_dump(obj, handle)

    monkeypatch.setattr(ledger_module.json, "dump", dump_until_full)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1)
    t = trainer(tmp_path, [dp, ckpt], max_epochs=3, enable_checkpointing=True)
    with pytest.raises(OSError, match="disk full"):
        t.fit(tiny_task(), datamodule=TinyData())
    monkeypatch.setattr(ledger_module.json, "dump", real_dump)
    (ledger_file,) = tmp_path.glob("privacy_ledger-*.json")
    recorded = sum(n for *_, n in json.loads(ledger_file.read_text())["accountant"]["history"])
    assert recorded > 10  # the ledger holds steps taken after the epoch-1 checkpoint
    # a checkpoint write that fails half-way leaves the previous checkpoint intact (Lightning writes a temp file)
    before = (ckpt_dir / "last.ckpt").read_bytes()

    def failing_save(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        t.save_checkpoint(ckpt_dir / "last.ckpt")
    monkeypatch.undo()
    assert (ckpt_dir / "last.ckpt").read_bytes() == before
    dp2 = DifferentialPrivacy(noise_multiplier=1.0, delta=1e-3)
    t2 = trainer(tmp_path, [dp2], max_epochs=3)
    t2.fit(tiny_task(), datamodule=TinyData(), ckpt_path=ckpt_dir / "last.ckpt")
    # the steps the ledger recorded before the disk filled (more than the checkpoint's 10), then 2 more epochs
    assert dp2.accountant.steps == recorded + 20


def test_bookkeeping_refuses_unsupported_layers(tmp_path):
    task = ClassificationTask(nn.Sequential(nn.Linear(20, 16), nn.RMSNorm(16), nn.Linear(16, 2)))
    t = trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="bookkeeping")], max_steps=1)
    with pytest.raises(IncompatibleModelError, match=r"unsupported: backbone.1 \(RMSNorm"):
        t.fit(task, datamodule=TinyData())
