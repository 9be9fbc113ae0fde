"""ResNet18GN trains under DP: its residual blocks run out of place (torchvision's ``out += identity`` and in-place
ReLU broke every per-sample backend's hooks), and one DP-SGD step equals the sum of the clipped per-example
gradients from plain autograd (flat clipping, q = 1, negligible noise, SGD lr 1)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.models import resnet18

from dplit.callbacks import DifferentialPrivacy
from dplit.data.base import GroupedTensorDataset
from dplit.models import ResNet18GN
from dplit.models.resnet import group_norm

C = 1.0


class _Task(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.criterion = net, nn.MSELoss()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return {"loss": self.criterion(self(x).sum(-1), y)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class _Data(L.LightningDataModule):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        super().__init__()
        self.x, self.y, self.group_names, self.num_classes = x, y, ["all"], 1

    def train_dataloader(self) -> DataLoader:
        return DataLoader(GroupedTensorDataset(self.x, self.y, torch.zeros(len(self.y))), batch_size=len(self.y))


def test_forward_equals_torchvision_resnet18_with_groupnorm():
    torch.manual_seed(0)
    ours = ResNet18GN(num_classes=3).eval()
    reference = resnet18(num_classes=3, norm_layer=group_norm).eval()
    reference.load_state_dict(ours.net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), reference(x))
    assert not any(getattr(m, "inplace", False) for m in ours.modules())


@pytest.mark.parametrize("backend", ["hooks", "ghost"])
def test_dp_step_equals_sum_of_clipped_per_example_gradients(backend):
    torch.manual_seed(0)
    net = ResNet18GN(num_classes=2).double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        out = net(x).sum(-1)
    y = out + torch.tensor([1e-4, 1.0, 1e3], dtype=torch.float64)  # one example unclipped, the others clipped
    reference = copy.deepcopy(net)
    params = list(reference.parameters())
    grads = []
    for i in range(3):
        loss = nn.functional.mse_loss(reference(x[i : i + 1]).sum(-1), y[i : i + 1])
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    g = torch.stack(grads)  # [3, P]
    norms = g.norm(dim=1)
    assert norms[0] < C < norms[2], f"precondition: some clipped, some not ({norms})"
    expected = (g * (C / norms).clamp(max=1.0)[:, None]).sum(0)
    before = torch.cat([p.detach().reshape(-1).clone() for p in net.parameters()])
    dp = DifferentialPrivacy(noise_multiplier=1e-9, max_grad_norm=C, grad_sample_mode=backend, ledger=False)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[dp])  # fmt: skip
    trainer.fit(_Task(net), datamodule=_Data(x, y))
    update = before - torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    err = (update * 3 - expected).norm() / expected.norm()
    # the noise's norm is sigma * C * sqrt(P) ~ 3e-6 for ResNet18's 11.2M parameters; a missed layer is >> 1e-5
    assert err.item() < 2e-5, f"relative error {err.item():.3g} against per-example autograd"
