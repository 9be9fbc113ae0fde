"""DP under `trainer.precision: bf16-mixed` (CPU autocast): norms, clipping and noise in float32; unsafe ones refused.

References are independent of the code under test: per-example autograd in float32 without autocast.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from dp_helpers import TinyData, tiny_task, trainer
from test_privacy_callback import Probe, clipped_sum, per_example_grads
from torch import nn
from torch.nn import functional as F

from dplit.callbacks import DifferentialPrivacy
from dplit.privacy.bookkeeping import BookKeeping
from dplit.privacy.config import PrivacyConfigError
from dplit.privacy.precision import check_precision

C = 1.0


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _batch(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 1, 6, 6, generator=g), torch.randn(n, 3, generator=g)
    x[0] *= 1e3  # one example with a huge gradient
    return x, y


def _bf16_clipped_sum(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Book-keeping's clipped sum with the forward under CPU bfloat16 autocast (what `bf16-mixed` runs)."""
    net.zero_grad(set_to_none=True)
    bk = BookKeeping(net, max_grad_norm=C)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        assert out.dtype == torch.bfloat16  # the forward really ran in bfloat16
        F.mse_loss(out.float(), y).backward()
        bk.clip_into_grad()
    finally:
        bk.remove_hooks()
    assert bk.last_norms is not None and bk.last_norms.dtype == torch.float32
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


def _fp32_reference(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = []
    for i in range(len(x)):
        grads = torch.autograd.grad(F.mse_loss(net(x[i : i + 1]), y[i : i + 1]), list(net.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_bookkeeping_under_bf16_autocast_matches_the_fp32_clipped_sum_and_keeps_sensitivity_c():
    net, (x, y) = _net(), _batch()
    ref = _fp32_reference(net, x, y)
    assert ref[0].norm() > 1e3 * C and (ref[1:].norm(dim=1) > C).any()  # the huge one and others are clipped
    ours = _bf16_clipped_sum(net, x, y)
    expected = clipped_sum(ref, C)
    assert (ours - expected).norm() / expected.norm() < 2e-2  # bfloat16 forward: ~1% agreement
    for i in range(len(x)):  # each example's whole contribution, alone in its batch: norm <= C (float32 exact)
        alone = _bf16_clipped_sum(net, x[i : i + 1], y[i : i + 1])
        assert alone.norm() <= C * (1 + 1e-5)
        if ref[i].norm() > 1.05 * C:
            assert alone.norm() >= C * (1 - 1e-4)


class _GradDtypes(L.Callback):
    """The dtype of every parameter and of the noisy gradient the optimizer applied, per step."""

    def __init__(self) -> None:
        self.seen: set[torch.dtype] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for p in pl_module.parameters():
            self.seen |= {p.dtype, p.grad.dtype}


@pytest.mark.parametrize("mode", ["hooks", "bookkeeping"])
def test_bf16_mixed_update_is_the_fp32_clipped_mean_with_float32_noise(mode, tmp_path):
    data = TinyData(n=200, batch_size=40)
    data.x[:5] *= 1e3  # huge gradients: sensitivity must still be C (a bfloat16 norm would overshoot it)
    probe, dtypes = Probe(), _GradDtypes()
    dp = DifferentialPrivacy(noise_multiplier=1e-9, max_grad_norm=C, grad_sample_mode=mode, insecure_testing_seed=3)
    t = trainer(tmp_path, [dp, probe, dtypes], max_steps=3, precision="bf16-mixed")
    task = tiny_task(lr=1.0)
    t.fit(task, datamodule=data)
    assert t.precision == "bf16-mixed" and dp.accountant.steps == 3
    assert dtypes.seen == {torch.float32}  # parameters and the noisy gradient (noise added in float32)
    for s in probe.steps:
        ref = clipped_sum(per_example_grads(task, s["before"], s["batch"]), C) / 40
        update = s["before"] - s["after"]
        assert (update - ref).norm() / ref.norm() < 5e-2


def test_bf16_mixed_noise_std_is_sigma_c_over_b(tmp_path):
    """The noise added under bf16-mixed has std sigma*C/B: float32 Gaussian noise, not rounded away."""
    probe = Probe()
    dp = DifferentialPrivacy(
        noise_multiplier=2.0, max_grad_norm=C, grad_sample_mode="bookkeeping", insecure_testing_seed=3
    )
    t = trainer(tmp_path, [dp, probe], max_steps=2, precision="bf16-mixed")
    task = tiny_task(lr=1.0, hidden=256)
    t.fit(task, datamodule=TinyData(n=400, batch_size=40))
    for s in probe.steps:
        ref = clipped_sum(per_example_grads(task, s["before"], s["batch"]), C) / 40
        noise = (s["before"] - s["after"]) - ref
        assert abs(noise.std().item() / (2.0 * C / 40) - 1) < 0.05


@pytest.mark.parametrize(
    ("precision", "mode", "match"),
    [("bf16-mixed", "ghost", "grad_sample_mode: bookkeeping"), ("bf16-true", "hooks", "half-precision parameters")],
)
def test_unsafe_precision_is_refused_at_setup(precision, mode, match, tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=C, grad_sample_mode=mode)
    t = trainer(tmp_path, [dp], max_steps=1, precision=precision)
    with pytest.raises(PrivacyConfigError, match=match):
        t.fit(tiny_task(), datamodule=TinyData())
    assert dp.accountant is None or dp.accountant.steps == 0


def test_float16_loss_scaling_is_refused_with_the_fix():
    """16-mixed (GPU; Lightning runs it as bf16-mixed on CPU) scales the loss before clipping: refused by name."""
    with pytest.raises(PrivacyConfigError, match=r"16-mixed.*GradScaler.*bf16-mixed"):
        check_precision("16-mixed", "bookkeeping", True)
    check_precision("bf16-mixed", "bookkeeping", True)
    check_precision("32-true", "ghost", False)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")


@CUDA
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
def test_cuda_update_is_the_clipped_mean_of_per_example_autograd(mode, precision, tmp_path):
    """On a GPU: the noise-free update equals the CPU float32 clipped mean (bf16-mixed: within bfloat16 error)."""
    if mode == "ghost" and precision == "bf16-mixed":
        pytest.skip("refused by design (test_unsafe_precision_is_refused_at_setup)")
    data = TinyData(n=200, batch_size=40)
    data.x[:5] *= 1e3
    probe = Probe()
    dp = DifferentialPrivacy(noise_multiplier=1e-9, max_grad_norm=C, grad_sample_mode=mode, insecure_testing_seed=3)
    t = trainer(tmp_path, [dp, probe], max_steps=3, precision=precision, accelerator="gpu")
    task = tiny_task(lr=1.0)
    t.fit(task, datamodule=data)
    assert dp.accountant.steps == 3
    tol = 5e-2 if precision == "bf16-mixed" else 1e-4
    for s in probe.steps:
        before, after = s["before"].cpu(), s["after"].cpu()
        ref = clipped_sum(per_example_grads(task.cpu(), before, [b.cpu() for b in s["batch"]]), C) / 40
        assert ((before - after) - ref).norm() / ref.norm() < tol


@CUDA
def test_cuda_float16_mixed_is_refused(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=C, grad_sample_mode="bookkeeping")
    t = trainer(tmp_path, [dp], max_steps=1, precision="16-mixed", accelerator="gpu")
    with pytest.raises(PrivacyConfigError, match="GradScaler"):
        t.fit(tiny_task(), datamodule=TinyData())
