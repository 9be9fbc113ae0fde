"""The DP LSTM: same function as torch's nn.LSTM, exact gradients, and per-example gradients (Opacus hooks and
book-keeping clipping, incl. sparse embedding norms) equal to per-example autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dplit.models.lstm import LSTM, LSTMScan
from dplit.privacy.backends import make_backend
from dplit.privacy.bookkeeping import BookKeeping, check_supported
from dplit.privacy.config import PrivacyConfig


@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True), (3, True)])
def test_matches_torch_lstm_outputs_and_gradients(layers, bidirectional):
    torch.manual_seed(0)
    ref = nn.LSTM(5, 4, num_layers=layers, bidirectional=bidirectional, batch_first=True).double()
    ours = LSTM.from_torch(ref).double()
    x = torch.randn(3, 7, 5, dtype=torch.double, requires_grad=True)
    out_ref, (h_n, _) = ref(x)
    out, final = ours(x)
    torch.testing.assert_close(out, out_ref)
    final_ref = torch.cat([h_n[-2], h_n[-1]], 1) if bidirectional else h_n[-1]
    torch.testing.assert_close(final, final_ref)
    w = torch.randn_like(out)
    (gx_ref,) = torch.autograd.grad((out_ref * w).sum() + final_ref.pow(2).sum(), [x], retain_graph=True)
    loss = (out * w).sum() + final.pow(2).sum()
    gx, *gw = torch.autograd.grad(loss, [x, *ours.parameters()])
    torch.testing.assert_close(gx, gx_ref)
    # weight gradients, mapped back from torch's layout
    gw_ref = torch.autograd.grad((out_ref * w).sum() + final_ref.pow(2).sum(), list(ref.parameters()))
    names = [n for n, _ in ref.named_parameters()]
    grads_ref = dict(zip(names, gw_ref))
    h = 4
    order = torch.cat([torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h)])
    named = dict(zip([n for n, _ in ours.named_parameters()], gw))
    for layer in range(layers):
        sfx = [""] + (["_reverse"] if bidirectional else [])
        torch.testing.assert_close(
            named[f"hh.{layer}.weight"], torch.stack([grads_ref[f"weight_hh_l{layer}{s}"][order] for s in sfx])
        )
        torch.testing.assert_close(
            named[f"ih.{layer}.weight"], torch.cat([grads_ref[f"weight_ih_l{layer}{s}"][order] for s in sfx])
        )
        torch.testing.assert_close(
            named[f"ih.{layer}.bias"], torch.cat([grads_ref[f"bias_ih_l{layer}{s}"][order] for s in sfx])
        )


def test_gradcheck_with_padding():
    torch.manual_seed(1)
    lstm = LSTM(3, 2, num_layers=2, bidirectional=True).double()
    x = torch.randn(2, 5, 3, dtype=torch.double, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    params = list(lstm.parameters())

    def f(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(
            lstm, dict(zip([n for n, _ in lstm.named_parameters()], ps))
        ):
            out, final = lstm(x, mask)
        return out, final

    assert torch.autograd.gradcheck(f, (x, *[p.detach().clone().requires_grad_() for p in params]))


def test_padding_is_invisible():
    """A right-padded sequence gives the unpadded sequence's outputs, final states and gradients."""
    torch.manual_seed(2)
    lstm = LSTM(3, 4, num_layers=2, bidirectional=True).double()
    x = torch.randn(1, 4, 3, dtype=torch.double)
    padded = torch.cat([x, torch.randn(1, 3, 3, dtype=torch.double)], 1).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    x = x.clone().requires_grad_()
    out, final = lstm(x)
    out_p, final_p = lstm(padded, mask)
    torch.testing.assert_close(final_p, final)
    torch.testing.assert_close(out_p[:, :4], out)
    g = torch.autograd.grad(final.sum(), [x, *lstm.parameters()])
    g_p = torch.autograd.grad(final_p.sum(), [padded, *lstm.parameters()])
    torch.testing.assert_close(g_p[0][:, :4], g[0])
    assert g_p[0][:, 4:].abs().max() == 0  # padded tokens get no gradient
    for a, b in zip(g[1:], g_p[1:]):
        torch.testing.assert_close(a, b)


class TextNet(nn.Module):
    """Embedding (padding row 0) -> BiLSTM -> final states -> Linear, like the tweets backbone."""

    def __init__(self, vocab: int = 30, dim: int = 6, hidden: int = 5) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=0)
        self.lstm = LSTM(dim, hidden, num_layers=2, bidirectional=True)
        self.head = nn.Linear(2 * hidden, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embedding(ids), ids != 0)[1])


def _batch(n: int = 5, t: int = 8, vocab: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, t), generator=g)
    ids[:, 3:] = ids[:, 3:] * (torch.rand(n, t - 3, generator=g) < 0.5)  # ragged right padding
    ids = torch.where(torch.arange(t) >= torch.randint(3, t + 1, (n, 1), generator=g), 0, ids)
    ids[0, 1] = ids[0, 2]  # a repeated token within one example (its rows add before the norm)
    return ids, torch.randint(0, 3, (n,), generator=g)


def _reference_grads(net: nn.Module, ids: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per-example gradients by running autograd on each example alone, flattened: [n, P]."""
    out = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(net(ids[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [p for p in net.parameters() if p.requires_grad])
        out.append(torch.cat([g.flatten() for g in grads]))
    return out


def test_opacus_hooks_per_example_grads_equal_autograd():
    torch.manual_seed(3)
    net = TextNet().double()
    ids, y = _batch()
    ref = torch.stack(_reference_grads(net, ids, y))
    hooks = make_backend(net, PrivacyConfig(noise_multiplier=1.0, grad_sample_mode="hooks"))
    try:
        nn.functional.cross_entropy(net(ids), y).backward()
        ours = torch.cat([p.grad_sample.flatten(1) for p in net.parameters()], 1)
    finally:
        hooks.detach()
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("freeze_embedding", [False, True])
def test_bookkeeping_clipped_sum_equals_autograd(freeze_embedding):
    torch.manual_seed(4)
    net = TextNet().double()
    net.embedding.weight.requires_grad_(not freeze_embedding)
    ids, y = _batch(n=6, seed=1)
    ref = torch.stack(_reference_grads(net, ids, y))  # [n, P]
    norms = ref.norm(dim=1)
    c = norms.median().item()  # some examples clipped, some not
    assert (norms > c).any() and (norms < c).any()
    expected = (ref * (c / norms).clamp(max=1.0)[:, None]).sum(0)
    bk = BookKeeping(net, max_grad_norm=c)
    try:
        nn.functional.cross_entropy(net(ids), y).backward()
        bk.clip_into_grad()
    finally:
        bk.remove_hooks()
    torch.testing.assert_close(bk.last_norms.double(), norms, rtol=1e-5, atol=1e-8)
    ours = torch.cat([p.grad.flatten() for p in net.parameters() if p.requires_grad])
    torch.testing.assert_close(ours, expected, rtol=2e-5, atol=1e-8)  # the clip factor is C / (norm + 1e-6)
    assert net.embedding.weight.grad is None or net.embedding.weight.grad[0].abs().max() == 0  # padding row


def test_bookkeeping_long_sequences_use_materialised_norms():
    """T^2 above the weight size switches from ghost norms to per-example gradients: same result."""
    torch.manual_seed(5)
    net = TextNet(dim=2, hidden=1).double()
    ids, y = _batch(n=4, t=12, seed=2)
    ref = torch.stack(_reference_grads(net, ids, y))
    bk = BookKeeping(net, max_grad_norm=1e6)
    try:
        nn.functional.cross_entropy(net(ids), y).backward()
        bk.clip_into_grad()
    finally:
        bk.remove_hooks()
    torch.testing.assert_close(bk.last_norms.double(), ref.norm(dim=1), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in net.parameters()]), ref.sum(0))


def test_bookkeeping_refuses_embedding_options():
    with pytest.raises(ValueError, match=r"Embedding: sparse / scale_grad_by_freq / max_norm"):
        check_supported(nn.Sequential(nn.Embedding(10, 3, max_norm=1.0)))
    check_supported(nn.Sequential(nn.Embedding(10, 3, padding_idx=0), LSTMScan(3)))


def test_scan_rejects_bad_directions():
    with pytest.raises(ValueError, match="num_directions"):
        LSTMScan(4, num_directions=3)
