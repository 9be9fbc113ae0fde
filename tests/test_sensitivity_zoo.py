"""Sensitivity of one DP-SGD step, per backend x model: every trainable parameter clipped, or the run refused.

Through the public callback, on a zoo of models that trip up per-sample-gradient rules (frozen weights with trainable
biases, BitFit, LoRA, bare parameters, tied / twice-used weights, padded convolutions, norms, LSTM, attention). For
each (grad_sample_mode, model), either the run is refused with a message naming the offending parameter and another
backend, or
  (a) one example (N = B = 1, so q = 1) with a raw gradient >= 100 C moves the parameters by at most C (lr = 1,
      negligible noise): the sensitivity of the update is C, over ALL trainable parameters;
  (b) with N = B = 6 (q = 1: every example in the batch, checked against what training_step saw), B * update equals
      sum_i clip_C(g_i) computed by per-example autograd on a copy of the model (flat clipping).
The reference never uses dplit or Opacus code (dplit's LSTM is re-run in plain autograd ops for it).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from zoo_models import ZOO, build, reference_forward

from dplit.callbacks import DifferentialPrivacy
from dplit.data.base import GroupedTensorDataset
from dplit.privacy.compat import IncompatibleModelError
from dplit.privacy.config import PrivacyConfigError
from dplit.privacy.coverage import UncoveredParameterError, check_coverage

BACKENDS = ("hooks", "functorch", "ghost", "bookkeeping")
C = 1.0
SIGMA = 1e-9  # the callback refuses 0; noise std sigma*C/B per coordinate, far below the tolerances (checked below)
REFUSALS = (IncompatibleModelError, PrivacyConfigError, UncoveredParameterError)

# (backend, model) -> the parameter the refusal must name (a regex). Every other pair must pass (a) and (b).
REFUSED: dict[tuple[str, str], str] = {
    # book-keeping: no rule for these parameters
    ("bookkeeping", "lora_subclass"): r"net\.0\.lora_a",
    ("bookkeeping", "scale_leaf"): r"net\.1\.gamma",
    ("bookkeeping", "scale_parent"): r"net\.2\.gamma",
    ("bookkeeping", "rmsnorm"): r"net\.1\.weight",
    ("bookkeeping", "linear_twice"): r"net\.fc\.weight",  # at run time: the module runs twice in one forward
    ("bookkeeping", "functional_tied"): r"trainable net\.bias",  # statically; without the bias, at run time:
    ("bookkeeping", "functional_tied_nobias"): r"net\.emb\.weight \(owned by net\.emb\) used by",
    # a weight read outside its own layer's forward (OutsideUseGuard, at run time; every backend)
    **{
        (b, m): r"net\.emb\.weight \(owned by net\.emb\) used by"
        for b in ("hooks", "functorch", "ghost")
        for m in ("functional_tied", "functional_tied_nobias")
    },
    # ghost clipping: per-layer norms cannot see the cross terms of a weight used twice
    ("ghost", "tied_embedding"): r"net\.emb\.weight",
    ("ghost", "linear_twice"): r"net\.fc\.weight",  # at run time
    # Opacus' conv rule unfolds with zero padding
    **{
        (b, f"conv_{m}"): r"net\.conv\.weight" for b in ("hooks", "ghost") for m in ("reflect", "replicate", "circular")
    },
    # Opacus' Embedding rules ignore scale_grad_by_freq
    ("hooks", "embedding_grad_by_freq"): r"net\.emb\.weight",
    ("ghost", "embedding_grad_by_freq"): r"net\.emb\.weight",
    ("bookkeeping", "embedding_grad_by_freq"): r"net\.emb\.weight",
    # functorch cannot trace the hand-written LSTM backward
    ("functorch", "lstm"): r"net\.lstm\.hh\.0\.weight",
    # nn.MultiheadAttention has no per-sample rule (Opacus' validator asks for DPMultiheadAttention)
    **{(b, "torch_encoder_layer"): r"net\.layer\.self_attn" for b in BACKENDS},
}
AT_RUN_TIME = {  # seen when the layer runs twice, or when a weight is read outside its layer (OutsideUseGuard)
    ("bookkeeping", "linear_twice"),
    ("ghost", "linear_twice"),
    ("bookkeeping", "functional_tied_nobias"),
    *((b, m) for b in ("hooks", "functorch", "ghost") for m in ("functional_tied", "functional_tied_nobias")),
}


class ZooTask(L.LightningModule):
    """The task contract: loss through ``self.criterion`` (mean reduction), ``{"loss": loss}``; SGD lr 1.

    The prediction is the sum of the net's outputs, one scalar per example, so that the criterion's per-example loss
    (``reduction="none"``, which ghost clipping uses) is ``[B]``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.criterion = nn.MSELoss()
        self.seen: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        self.seen.append((x.detach().clone(), y.detach().clone()))
        return {"loss": self.criterion(self(x).sum(-1), y)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0, momentum=0.0, weight_decay=0.0)


class ZooData(L.LightningDataModule):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        super().__init__()
        self.x, self.y = x, y
        self.group_names, self.num_classes = ["all"], 1

    def train_dataloader(self) -> DataLoader:
        return DataLoader(GroupedTensorDataset(self.x, self.y, torch.zeros(len(self.y))), batch_size=len(self.y))


def per_example_grads(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Independent reference ``[n, P]``: autograd on each example alone, over all trainable parameters."""
    params = [p for p in net.parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        loss = F.mse_loss(reference_forward(net, x[i : i + 1]).sum(-1), y[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    return torch.stack(rows)


@dataclass
class Outcome:
    refused: str | None = None
    update: Tensor | None = None  # theta_before - theta_after over the trainable parameters [P]
    grads: Tensor | None = None  # reference per-example gradients of the batch training_step saw [n, P]
    frozen_moved: float = 0.0
    batch_size: int = 0


def run_step(backend: str, name: str, scales: list[float]) -> Outcome:
    """One DP-SGD step through the callback on ``len(scales)`` examples; example i's target is off by ``scales[i]``."""
    net = build(name)
    gen = torch.Generator().manual_seed(1)
    x = ZOO[name][1](len(scales), gen)
    with torch.no_grad():
        out = reference_forward(net, x).sum(-1)  # [n]
    sign = torch.randint(0, 2, out.shape, generator=gen) * 2 - 1
    y = out + torch.tensor(scales, dtype=out.dtype) * sign  # each example's gradient is proportional to its offset
    reference = copy.deepcopy(net)
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    task = ZooTask(net)
    dp = DifferentialPrivacy(noise_multiplier=SIGMA, max_grad_norm=C, grad_sample_mode=backend, ledger=False)
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[dp],
    )
    try:
        trainer.fit(task, datamodule=ZooData(x, y))
    except REFUSALS as err:
        return Outcome(refused=str(err))
    assert len(task.seen) == 1, "exactly one training step"
    xs, ys = task.seen[0]
    rows = x.flatten(1)
    assert len(ys) == len(scales) and all((rows == r).all(1).any() for r in xs.flatten(1)), "q = 1: the whole set"
    after = dict(net.named_parameters())
    trainable = [k for k, p in net.named_parameters() if p.requires_grad]
    update = torch.cat([(before[k] - after[k].detach()).reshape(-1) for k in trainable])
    frozen = [(before[k] - p.detach()).abs().max().item() for k, p in net.named_parameters() if not p.requires_grad]
    return Outcome(
        update=update,
        grads=per_example_grads(reference, xs, ys),
        frozen_moved=max(frozen, default=0.0),
        batch_size=len(ys),
    )


def check_message(backend: str, name: str, message: str) -> None:
    """A refusal names the offending parameter and what to use instead."""
    expected = REFUSED[(backend, name)]
    assert re.search(expected, message), f"the refusal does not name {expected}:\n{message}"
    others = [b for b in BACKENDS if b != backend and re.search(rf"grad_sample_mode: {b}\b|`{b}`", message)]
    fixes = ("DPMultiheadAttention", "Call the owning layer")
    assert others or any(f in message for f in fixes), f"the refusal suggests no alternative:\n{message}"


def outcome(backend: str, name: str, scales: list[float]) -> Outcome | None:
    """The trained outcome, or None once a refusal has been checked (statically by ``check_coverage``, and by the
    callback itself, whose message must name the parameter and an alternative)."""
    refuse = (backend, name) in REFUSED
    if refuse and (backend, name) not in AT_RUN_TIME:
        with pytest.raises(ValueError) as static:
            check_coverage(ZooTask(build(name)), backend)
        check_message(backend, name, str(static.value))
    out = run_step(backend, name, scales)
    if out.refused is not None:
        assert refuse, f"{backend} refused {name}, which it should train:\n{out.refused}"
        check_message(backend, name, out.refused)
        return None
    assert not refuse, f"{backend} trained {name}, which it must refuse"
    return out


CASES = [pytest.param(b, m, id=f"{b}-{m}") for b in BACKENDS for m in ZOO]


@pytest.mark.parametrize("backend,name", CASES)
def test_one_huge_example_moves_parameters_by_at_most_c(backend, name):
    """(a) N = B = 1 (q = 1), raw gradient >= 100 C: ||theta_before - theta_after|| <= C (lr 1, noise ~ 0)."""
    out = outcome(backend, name, [1e4])
    if out is None:
        return
    assert out.update is not None and out.grads is not None
    assert out.grads.norm() >= 100 * C, "precondition: a gradient far above C"
    assert SIGMA * C * out.update.numel() ** 0.5 < 1e-6, "precondition: the noise is negligible"
    assert out.frozen_moved == 0.0, "a frozen parameter moved"
    assert out.update.norm().item() <= C * (1 + 1e-4)
    # the one example's update is its clipped gradient: norm C, direction of its gradient
    torch.testing.assert_close(out.update, out.grads[0] * C / out.grads[0].norm(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend,name", CASES)
def test_update_equals_sum_of_clipped_per_example_gradients(backend, name):
    """(b) N = B = 6: B * update == sum_i clip_C(g_i), g_i from per-example autograd (flat clipping)."""
    out = outcome(backend, name, [1e-3, 1e-2, 0.3, 3.0, 30.0, 1e3])
    if out is None:
        return
    assert out.update is not None and out.grads is not None
    norms = out.grads.norm(dim=1)
    assert (norms < 0.9 * C).any() and (norms > 1.1 * C).any(), f"precondition: some clipped, some not ({norms})"
    expected = (out.grads * (C / norms).clamp(max=1.0)[:, None]).sum(0)
    assert out.frozen_moved == 0.0, "a frozen parameter moved"
    err = (out.update * out.batch_size - expected).norm() / expected.norm()
    assert err.item() < 1e-5, f"relative error {err.item():.3g} against per-example autograd"
