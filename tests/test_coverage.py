"""check_coverage / RepeatedUseGuard: which parameters each backend would mis-clip, named at setup or when it happens.

The cases refused here are the ones tests/test_sensitivity_zoo.py measures as wrong against per-example autograd.
"""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample.utils import prepare_module
from torch import nn
from torch.nn import functional as F

from dplit.models.lstm import LSTM
from dplit.privacy.coverage import RepeatedUseGuard, UncoveredParameterError, check_coverage, shared_parameters

OPACUS_MODES = ("hooks", "functorch", "ghost")


def _tied() -> nn.ModuleDict:
    emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    return nn.ModuleDict({"emb": emb, "head": head})


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d, nn.Conv3d])
def test_padded_convolutions_are_refused_where_opacus_pads_with_zeros(conv, padding_mode):
    net = nn.Sequential(conv(2, 2, 3, padding=1, padding_mode=padding_mode))
    for mode in ("hooks", "ghost"):
        with pytest.raises(UncoveredParameterError, match=rf"0\.weight, 0\.bias \({conv.__name__} with padding_mode="):
            check_coverage(net, mode)
    with pytest.raises(ValueError, match=r"grad_sample_mode: functorch"):
        check_coverage(net, "hooks")
    check_coverage(net, "functorch")
    check_coverage(nn.Sequential(conv(2, 2, 3, padding=1)), "hooks")  # zero padding is what the rule does
    net[0].requires_grad_(False)
    check_coverage(net, "ghost")  # frozen: nothing to clip


def test_tied_weights_are_refused_for_ghost_only():
    net = _tied()
    assert list(shared_parameters(net).values()) == [["emb", "head"]]
    with pytest.raises(UncoveredParameterError, match=r"emb\.weight \(shared by emb and head.*hooks` or `functorch`"):
        check_coverage(net, "ghost")
    for mode in ("hooks", "functorch", "bookkeeping"):  # Opacus sums per-use gradients; book-keeping: cross term
        check_coverage(net, mode)
    net["emb"].weight.requires_grad_(False)
    check_coverage(net, "ghost")


def test_functorch_refuses_the_dplit_lstm_by_parameter():
    net = nn.ModuleDict({"lstm": LSTM(3, 2, num_layers=2)})
    with pytest.raises(UncoveredParameterError, match=r"lstm\.hh\.0\.weight .*lstm\.hh\.1\.weight .*bookkeeping"):
        check_coverage(net, "functorch")
    check_coverage(net, "hooks")
    check_coverage(net, "bookkeeping")


@pytest.mark.parametrize("mode", OPACUS_MODES)
def test_multihead_attention_is_refused_with_the_opacus_replacement(mode):
    net = nn.ModuleDict({"attn": nn.MultiheadAttention(4, 2)})
    with pytest.raises(
        UncoveredParameterError, match=r"attn\.in_proj_weight, attn\.in_proj_bias .*DPMultiheadAttention"
    ):
        check_coverage(net, mode)


def test_embedding_options():
    for mode in OPACUS_MODES:
        with pytest.raises(UncoveredParameterError, match=r"0\.weight \(Embedding 0 with max_norm"):
            check_coverage(nn.Sequential(nn.Embedding(5, 3, max_norm=1.0)), mode)
    with pytest.raises(UncoveredParameterError, match=r"max_norm; trainable 0\.weight"):
        check_coverage(nn.Sequential(nn.Embedding(5, 3, max_norm=1.0)), "bookkeeping")
    by_freq = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True))
    for mode in ("hooks", "ghost", "bookkeeping"):
        with pytest.raises(UncoveredParameterError, match="scale_grad_by_freq"):
            check_coverage(by_freq, mode)
    check_coverage(by_freq, "functorch")
    for mode in (*OPACUS_MODES, "bookkeeping"):
        check_coverage(nn.Sequential(nn.Embedding(5, 3, padding_idx=0)), mode)  # dplit masks padded positions


def test_bookkeeping_delegates_to_its_rules_and_unknown_modes_are_refused():
    with pytest.raises(UncoveredParameterError, match=r"1 \(RMSNorm: no book-keeping rule; trainable 1\.weight"):
        check_coverage(nn.Sequential(nn.Linear(3, 4), nn.RMSNorm(4)), "bookkeeping")
    for mode in OPACUS_MODES:
        check_coverage(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.RMSNorm(3)), mode)
    with pytest.raises(ValueError, match="unknown grad_sample_mode 'ew'"):
        check_coverage(nn.Linear(2, 2), "ew")


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(torch.tanh(self.fc(x))))


def test_guard_names_a_layer_run_twice_before_opacus_ghost_hooks_fail():
    net = _Twice()
    hooks = prepare_module(
        net, grad_sample_mode="ghost", wrap_model=False, batch_first=True, loss_reduction="mean", max_grad_norm=1.0
    )
    guard = RepeatedUseGuard(net, "ghost")  # attached after Opacus, runs first
    try:
        x = torch.randn(4, 3)
        with torch.no_grad():
            net(x)
        net.eval()
        net(x)  # eval forwards are not counted
        net.train()
        with pytest.raises(
            UncoveredParameterError, match=r"layer fc \(Linear\) ran twice .*fc\.weight, fc\.bias.*hooks"
        ):
            net(x)
    finally:
        guard.remove()
        hooks.remove_hooks()
    assert not net.fc._forward_hooks


def test_guard_counts_per_step():
    net = _Twice()
    guard = RepeatedUseGuard(net, "ghost")
    x = torch.randn(4, 3)
    for _ in range(3):
        guard.reset()  # on_train_batch_start
        net.fc(x)
    with pytest.raises(UncoveredParameterError):
        net.fc(x)
    guard.remove()
    net(x)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "bookkeeping"])
def test_guard_attaches_nothing_where_repeated_use_is_handled(mode):
    net = _Twice()
    guard = RepeatedUseGuard(net, mode)
    F.mse_loss(net(torch.randn(2, 3)), torch.zeros(2, 3)).backward()
    assert not guard._handles and not guard.counts
