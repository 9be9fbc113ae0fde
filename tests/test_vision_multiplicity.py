"""Augmentation multiplicity: K views of an item are one privacy unit; one item moves the model by at most C."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from dp_helpers import trainer
from torch import nn
from vision_fixtures import write_cifar_pickles

from dplit.callbacks import DifferentialPrivacy
from dplit.data.cifar import CIFARDataModule
from dplit.tasks import ClassificationTask, MultiViewClassificationTask

C, K = 1.0, 3


class Recording(MultiViewClassificationTask):
    def training_step(self, batch, batch_idx):
        self.seen = batch[0].clone()
        return super().training_step(batch, batch_idx)


def _data(root, **kwargs) -> CIFARDataModule:
    return CIFARDataModule(root=str(root), format="pickle", val_size=5, resize=12, crop=8, augmentation_multiplicity=K,
                           **kwargs)  # fmt: skip


def test_views_for_training_only_and_per_item_losses(tmp_path):
    dm = _data(write_cifar_pickles(tmp_path, "cifar10", 2, 1), batch_size=4)
    x, y, group = next(iter(dm.train_dataloader()))
    assert x.shape == (4, K, 3, 8, 8) and not torch.equal(x[:, 0], x[:, 1])  # independent random crops
    assert next(iter(dm.val_dataloader()))[0].dim() == 4
    task = MultiViewClassificationTask(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)))
    out, targets, g = task.forward_batch((x, y, group))
    assert out.shape == (4 * K, 10) and torch.equal(targets, y.repeat_interleave(K)) and torch.equal(g, group)
    rows = nn.functional.cross_entropy(out, targets, reduction="none")
    torch.testing.assert_close(task.per_example_loss(out, targets), rows.reshape(4, K).mean(1))
    two = torch.stack([group, group], dim=1)  # several attributes: still one unit per item ([B, A] kept as is)
    assert torch.equal(task.forward_batch((x, y, two))[2], two)
    with pytest.raises(ValueError, match="augment"):
        CIFARDataModule(augmentation_multiplicity=2, augment=False)


def _backbone(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    return nn.Sequential(  # 8x8 -> 8x8 -> 3x3: convolutions (one grouped) and a GroupNorm
        nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, groups=2),
        nn.Tanh(), nn.Flatten(), nn.Linear(6 * 3 * 3, 10),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        ("hooks", "linear"),
        ("functorch", "linear"),
        ("hooks", "conv"),
        ("bookkeeping", "linear"),
        ("bookkeeping", "conv"),
    ],  # fmt: skip
)
def test_an_items_views_together_move_the_model_by_at_most_c(tmp_path, mode, kind):
    root = write_cifar_pickles(tmp_path, "cifar10", 1, 1)
    dm = _data(root, batch_size=1, limit_train=1)  # one item, q = 1: the update is its clipped unit gradient
    backbone = _backbone(kind)
    task = Recording(backbone, optimizer=partial(torch.optim.SGD, lr=1.0))
    before = [p.detach().clone() for p in backbone.parameters()]
    dp = DifferentialPrivacy(noise_multiplier=1e-9, max_grad_norm=C, grad_sample_mode=mode)
    trainer(tmp_path, [dp], max_steps=1).fit(task, datamodule=dm)
    update = torch.cat([(b - a).reshape(-1) for b, a in zip(before, backbone.parameters(), strict=True)])
    # Independent reference: each view's own loss gradient at the starting weights.
    net = _backbone(kind)
    nn.utils.vector_to_parameters(torch.cat([b.reshape(-1) for b in before]), net.parameters())
    y = dm.splits()["train"].y[:1]
    rows = []
    for k in range(K):
        loss = nn.functional.cross_entropy(net(task.seen[:, k]), y)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))]))
    unit = sum(rows) / K  # the mean of the views' gradients (De et al.), then clipped
    assert min(r.norm() for r in rows) > 2 * C  # every view alone would be clipped
    assert sum(r * C / r.norm() for r in rows).norm() > 1.5 * C  # clipping views separately: up to K x C
    assert update.norm() <= C * (1 + 1e-4)
    torch.testing.assert_close(update, unit * C / unit.norm(), rtol=1e-4, atol=1e-6)
    assert dp.accountant.steps == 1


def test_utkface_faces_k_views_are_one_unit(utkface_root, tmp_path):
    """UTKFace with K views: a face's K view rows (group [B, 3]) move the model by at most C together."""
    from dplit.data.utkface import UTKFaceDataModule

    dm = UTKFaceDataModule(root=str(utkface_root), resize=12, crop=8, augmentation_multiplicity=K, batch_size=1,
                           limit_train=1)  # fmt: skip
    x, y, group = next(iter(dm.train_dataloader()))
    assert x.shape == (1, K, 3, 8, 8) and group.shape == (1, 3) and next(iter(dm.val_dataloader()))[0].dim() == 4
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    task = Recording(backbone, optimizer=partial(torch.optim.SGD, lr=1.0))
    before = [p.detach().clone() for p in backbone.parameters()]
    dp = DifferentialPrivacy(noise_multiplier=1e-9, max_grad_norm=C, grad_sample_mode="hooks")
    trainer(tmp_path, [dp], max_steps=1).fit(task, datamodule=dm)
    update = torch.cat([(b - a).reshape(-1) for b, a in zip(before, backbone.parameters(), strict=True)])
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    nn.utils.vector_to_parameters(torch.cat([b.reshape(-1) for b in before]), net.parameters())
    target = dm.splits()["train"].y[:1]
    rows = []
    for k in range(K):
        loss = nn.functional.cross_entropy(net(task.seen[:, k]), target)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))]))
    unit = sum(rows)
    assert update.norm() <= C * (1 + 1e-4) and sum(r.norm() for r in rows) > 1.5 * C  # K rows, one clipped unit
    torch.testing.assert_close(update, unit * C / unit.norm(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="augment"):
        UTKFaceDataModule(augmentation_multiplicity=2, augment=False)


class RecordingSingle(ClassificationTask):
    def training_step(self, batch, batch_idx):
        self.seen = batch[0].clone()
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("algorithm", ["dpsgd", "automatic_clipping", "dpsgd_f", "not-elementwise"])
def test_a_wide_conv_is_clipped_in_one_pass_for_elementwise_factors(tmp_path, algorithm, monkeypatch):
    """Book-keeping through the DP callback: an algorithm whose factors are elementwise (DP-SGD's and the
    mitigations', group ids sliced per chunk) lets a conv with per-example gradients larger than its captures be
    clipped chunk by chunk (clip_deferred); one declared otherwise does not. The DP-SGD update equals the clipped
    per-example autograd gradients summed over the (q = 1) batch."""
    import dplit.privacy.bookkeeping as bookkeeping
    from dplit.privacy.mitigations import AutomaticClipping

    if algorithm == "not-elementwise":
        monkeypatch.setattr(AutomaticClipping, "elementwise_factors", False)
        algorithm = "automatic_clipping"
        expect: list[str] = []
    else:
        expect = ["Conv2d"]

    deferred, recomputed = [], []
    real, real_recompute = bookkeeping.clip_deferred, bookkeeping.recompute_weight
    monkeypatch.setattr(
        bookkeeping, "clip_deferred", lambda layers, *rest: deferred.extend(layers) or real(layers, *rest)
    )
    monkeypatch.setattr(
        bookkeeping, "recompute_weight", lambda m, *rest: recomputed.append(m) or real_recompute(m, *rest)
    )
    root = write_cifar_pickles(tmp_path, "cifar10", 1, 1)
    dm = CIFARDataModule(root=str(root), format="pickle", val_size=5, resize=8, crop=8, augment=False, batch_size=4,
                         limit_train=4)  # fmt: skip

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(  # the second conv: 1,152 weights an example against 512 + 256 captured values
            nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Tanh(),
            nn.Flatten(), nn.Linear(256, 10),
        )  # fmt: skip

    backbone = net()
    task = RecordingSingle(backbone, optimizer=partial(torch.optim.SGD, lr=1.0))
    before = [p.detach().clone() for p in backbone.parameters()]
    dp = DifferentialPrivacy(
        noise_multiplier=1e-9, max_grad_norm=C, grad_sample_mode="bookkeeping", algorithm=algorithm
    )
    trainer(tmp_path, [dp], max_steps=1).fit(task, datamodule=dm)
    assert [type(m).__name__ for m, _, _ in deferred] == expect
    assert not recomputed  # the chunks' factors (group ids sliced per chunk) were the batch's
    if algorithm != "dpsgd":
        return
    update = torch.cat([(b - a).reshape(-1) for b, a in zip(before, backbone.parameters(), strict=True)])
    ref = net()
    y = dm.splits()["train"].y[:4]
    clipped, clipped_from = [], []
    for i in range(4):
        loss = nn.functional.cross_entropy(ref(task.seen[i : i + 1]), y[i : i + 1])
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(ref.parameters()))])
        clipped_from.append(grad)
        clipped.append(grad * min(1.0, C / (grad.norm().item() + 1e-6)))
    assert len(task.seen) == 4 and sum(g.norm() > 1.5 * C for g in clipped_from) >= 2  # clipping matters
    torch.testing.assert_close(update, sum(clipped) / 4, rtol=1e-4, atol=1e-6)  # the mean over q * N = 4
