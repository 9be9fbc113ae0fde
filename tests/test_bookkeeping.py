"""Book-keeping clipping: coverage per trainable parameter, exact against per-example autograd (no Lightning)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dplit.privacy.bookkeeping import BookKeeping, check_supported
from dplit.privacy.coverage import UncoveredParameterError


def _reference(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example gradients [n, P] over the trainable parameters, one autograd call per example."""
    params = [p for p in net.parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        grads = torch.autograd.grad(F.mse_loss(net(x[i : i + 1]), y[i : i + 1]), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _clip_with_bookkeeping(net: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float) -> BookKeeping:
    bk = BookKeeping(net, max_grad_norm=c)
    try:
        F.mse_loss(net(x), y).backward()
        bk.clip_into_grad()
    finally:
        bk.remove_hooks()
    return bk


def _check_exact(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> BookKeeping:
    ref = _reference(net, x, y)
    norms = ref.norm(dim=1)
    c = norms.median().item()  # some examples clipped, some not
    assert (norms > c * 1.01).any() and (norms < c * 0.99).any()
    bk = _clip_with_bookkeeping(net, x, y, c)
    torch.testing.assert_close(bk.last_norms.double(), norms, rtol=1e-5, atol=1e-8)
    ours = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.requires_grad])
    torch.testing.assert_close(ours, (ref * (c / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0))
    return bk


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding,stride,dilation", [(1, 1, 1), ((2, 1), 2, 1), ("same", 1, 2), ("valid", 1, 1)])
def test_conv2d_every_padding_is_exact(padding_mode, padding, stride, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (2, 3), padding=padding, padding_mode=padding_mode, stride=stride, dilation=dilation)
    net = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(7, 2, 6, 5, dtype=torch.double)
    net(x)  # materialise the lazy head
    _check_exact(net, x, torch.randn(7, 2, dtype=torch.double) * torch.logspace(-2, 2, 7, dtype=torch.double)[:, None])


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_bias_only_models_clip_the_biases_and_leave_frozen_weights_without_grad(layer):
    torch.manual_seed(1)
    if layer == "linear":
        net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        x = torch.randn(6, 3, 4, dtype=torch.double)  # a sequence dimension: the bias sums over it
        y = torch.randn(6, 3, 2, dtype=torch.double)
    else:
        net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Tanh()).double()
        x, y = torch.randn(6, 2, 4, 4, dtype=torch.double), torch.randn(6, 3, 4, 4, dtype=torch.double)
    y = y * torch.logspace(-2, 2, 6, dtype=torch.double).view(-1, *[1] * (y.dim() - 1))
    for m in net:
        if hasattr(m, "weight"):
            m.weight.requires_grad_(False)
    bk = _check_exact(net, x, y)
    assert all(m.weight.grad is None for m in net if hasattr(m, "weight"))
    assert bk.covered_parameters() == {p for p in net.parameters() if p.requires_grad}


def test_trainable_bias_under_frozen_weight_is_clipped():
    """The red-team case: before, the bias kept its raw mean gradient (the update was 870 C)."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    net[2].weight.requires_grad_(False)
    x = torch.randn(6, 4, dtype=torch.double)
    _check_exact(net, x, torch.randn(6, 2, dtype=torch.double) * torch.logspace(-2, 3, 6, dtype=torch.double)[:, None])


class _Adapter(nn.Linear):
    def __init__(self) -> None:
        super().__init__(4, 3)
        self.lora = nn.Parameter(torch.zeros(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x @ self.lora.T


@pytest.mark.parametrize(
    "build,pattern",
    [
        (
            lambda: nn.Sequential(_Adapter()),
            r"0 \(_Adapter: subclass of Linear.*trainable 0\.weight, 0\.bias, 0\.lora\)",
        ),
        (lambda: nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6)), r"1 \(RMSNorm: no book-keeping rule; trainable"),
        (lambda: nn.Sequential(nn.Conv3d(4, 4, 3)), r"0 \(Conv3d: no book-keeping rule; trainable 0\.weight"),
        (lambda: nn.Sequential(nn.Embedding(5, 3, sparse=True)), r"Embedding: sparse / scale_grad_by_freq"),
        (lambda: nn.MultiheadAttention(4, 2), r"<root> \(MultiheadAttention: .*DPMultiheadAttention"),
    ],
    ids=["linear-subclass", "rmsnorm", "conv3d", "sparse-embedding", "multihead-attention"],
)
def test_check_supported_names_each_uncovered_parameter(build, pattern):
    with pytest.raises(UncoveredParameterError, match=pattern) as err:
        check_supported(build())
    assert isinstance(err.value, ValueError) and "grad_sample_mode: hooks" in str(err.value)


def test_extra_parameter_on_an_exact_linear_is_refused():
    lin = nn.Linear(4, 3)
    lin.register_parameter("gate", nn.Parameter(torch.ones(3)))
    with pytest.raises(ValueError, match=r"parameters outside the Linear rule: gate; trainable .*gate"):
        check_supported(nn.Sequential(lin))


def test_frozen_unsupported_layers_and_frozen_tied_weights_are_fine():
    emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    emb.weight.requires_grad_(False)
    check_supported(nn.ModuleDict({"emb": emb, "head": head, "norm": nn.LayerNorm(3).requires_grad_(False)}))


def test_tied_weights_other_than_an_embedding_and_its_head_are_refused_by_name():
    emb, head = nn.Linear(5, 3), nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"emb\.weight \(shared by emb and head: only an nn\.Embedding tied"):
        check_supported(nn.ModuleDict({"emb": emb, "head": head}))


class _MaybeTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.twice = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.fc(torch.tanh(h)) if self.twice else h


def test_a_layer_run_twice_is_refused_when_it_happens_and_the_next_step_is_clean():
    torch.manual_seed(3)
    net = _MaybeTwice().double()
    x = torch.randn(6, 3, dtype=torch.double)
    y = torch.randn(6, 3, dtype=torch.double) * torch.logspace(-2, 2, 6, dtype=torch.double)[:, None]
    net.twice = False
    ref = _reference(net, x, y)  # the single-use model's per-example gradients (before any hook is attached)
    norms = ref.norm(dim=1)
    net.twice = True
    bk = BookKeeping(net, max_grad_norm=1.0)
    try:
        with torch.no_grad():
            net(x)  # evaluation forwards are not uses
        F.mse_loss(net(x), y).backward()
        with pytest.raises(UncoveredParameterError, match=r"layer fc \(Linear\) ran 2 times .*fc\.weight, fc\.bias"):
            bk.clip_into_grad()
        net.twice = False  # the next step, on the SAME instance, is exact: nothing of the refused step remains
        net.zero_grad()
        F.mse_loss(net(x), y).backward()
        bk.clip_into_grad()
        ours = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.requires_grad])
        torch.testing.assert_close(ours, (ref * (1.0 / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0))
    finally:
        bk.remove_hooks()


@pytest.mark.parametrize("variant", ["affine", "frozen_weight", "no_affine", "2d_input"])
def test_groupnorm_affine_parameters_are_clipped_per_example(variant):
    """GroupNorm (the DP-safe normalisation of ResNet18GN and BN -> GN swaps): each example's own statistics, so its
    affine gradients are per example; against one autograd call per example."""
    torch.manual_seed(7)
    if variant == "2d_input":
        net = nn.Sequential(nn.Linear(5, 6), nn.GroupNorm(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
        x = torch.randn(6, 5, dtype=torch.double)
    else:
        norm = nn.GroupNorm(2, 4, affine=variant != "no_affine")
        net = nn.Sequential(nn.Conv2d(3, 4, 3), norm, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).double()
        with torch.no_grad():  # away from the init (1, 0), so a wrong xhat or a missing factor shows
            for p in norm.parameters():
                p.uniform_(-1.5, 1.5)
        if variant == "frozen_weight":
            norm.weight.requires_grad_(False)
        scale = torch.logspace(-1, 1, 6, dtype=torch.double)[:, None, None, None]
        x = torch.randn(6, 3, 6, 6, dtype=torch.double) * scale
    y = torch.randn(6, 2, dtype=torch.double) * torch.logspace(-1, 1, 6, dtype=torch.double)[:, None]
    check_supported(net)
    _check_exact(net, x, y)
    if variant == "frozen_weight":
        assert net[1].weight.grad is None and net[1].bias.grad is not None
