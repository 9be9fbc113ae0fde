"""Book-keeping clipping of timm's ``Conv2dSame`` (TensorFlow "SAME" padding, in every ``tf_*`` EfficientNet)
against per-example autograd (torch.func vmap/grad), and the refusals around it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from dplit.privacy.bookkeeping import BookKeeping, check_supported, uncovered_parameters
from dplit.privacy.bookkeeping_coverage import same_padding
from dplit.privacy.coverage import UncoveredParameterError

conv2d_same = pytest.importorskip("timm.layers.conv2d_same", reason="timm (the `vision` extra) is not installed")


def _per_example_clipped_sum(net: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([v.flatten(1) for v in per.values()], 1)  # [n, P]
    return (flat * (c / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)[:, None]).sum(0)


def _bookkeeping_sum(net: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    bk = BookKeeping(net, max_grad_norm=c)
    try:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        bk.clip_into_grad()
    finally:
        bk.remove_hooks()
    assert bk.last_norms is not None
    got = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.requires_grad])
    return got, bk.last_norms


@pytest.mark.parametrize("size", [7, 8], ids=["odd-7", "even-8"])  # SAME pads asymmetrically on one of them
def test_same_padding_convs_are_clipped_exactly(size):
    """Strided, depthwise and dilated Conv2dSame layers (the first one hidden from autograd, the padding asymmetric
    for stride 2 on even sizes): book-keeping's clipped sum equals per-example autograd's, most examples clipped."""
    same = conv2d_same.Conv2dSame
    torch.manual_seed(11)
    net = nn.Sequential(
        same(3, 6, 3, stride=2),
        nn.Tanh(),
        same(6, 6, 5, stride=2, groups=6),  # depthwise, like EfficientNet's conv_dw
        nn.Tanh(),
        same(6, 4, 3, dilation=2, bias=False),
        nn.Flatten(),
        nn.LazyLinear(5),
    ).double()
    x = torch.randn(6, 3, size, size, dtype=torch.double)
    net(x)
    y = torch.randint(0, 5, (6,))
    check_supported(net)
    assert all(same_padding(m) is not None for m in net if isinstance(m, same))
    c = 0.1
    expected = _per_example_clipped_sum(net, x, y, c)
    got, norms = _bookkeeping_sum(net, x, y, c)
    torch.testing.assert_close(got, expected)
    assert (norms > c).sum() >= 4  # the factors bite


def test_every_layer_of_tf_efficientnet_lite0_is_covered_and_exact():
    """The whole EfficientNet-Lite0 (Conv2dSame stem and strided depthwise convs, BatchNorm frozen in eval mode,
    every other weight trainable) is covered, and its clipped sum equals per-example autograd's on 3 images."""
    from dplit.models import TimmBackbone

    torch.manual_seed(0)
    net = TimmBackbone(name="tf_efficientnet_lite0", num_classes=3, batchnorm="frozen", trainable_layers=None).double()
    kinds = {type(m).__name__ for m in net.modules() if isinstance(m, nn.Conv2d)}
    assert "Conv2dSame" in kinds
    assert uncovered_parameters(net) == []
    net.train()
    x = torch.randn(3, 3, 32, 32, dtype=torch.double)
    y = torch.tensor([0, 1, 2])
    expected = _per_example_clipped_sum(net, x, y, 0.5)
    got, norms = _bookkeeping_sum(net, x, y, 0.5)
    torch.testing.assert_close(got, expected)
    assert (norms > 0.5).all()


def test_other_same_padding_variants_are_refused_by_name():
    """Only the exact Conv2dSame with zero own padding has the rule: the export variant (which caches its padding for
    the first input size) and a Conv2dSame given its own padding are refused, naming the parameter."""
    export = nn.Sequential(conv2d_same.Conv2dSameExport(2, 3, 3, stride=2))
    with pytest.raises(UncoveredParameterError, match=r"0 \(Conv2dSameExport: subclass of Conv2d.*trainable 0\.weight"):
        check_supported(export)
    padded = conv2d_same.Conv2dSame(2, 3, 3)
    padded.padding = (1, 1)
    assert same_padding(padded) is None
    with pytest.raises(UncoveredParameterError, match=r"Conv2dSame: subclass of Conv2d"):
        check_supported(nn.Sequential(padded))


def test_a_forward_that_no_longer_matches_the_rule_fails_loudly(monkeypatch):
    """If a timm version's forward padded differently, the captured input would not convolve to the output's size:
    the step fails naming the layer type and the alternative instead of clipping the wrong gradient."""
    m = conv2d_same.Conv2dSame(2, 3, 3, stride=2).double()
    net = nn.Sequential(m, nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(2, 2, 8, 8, dtype=torch.double)
    net(x)
    bk = BookKeeping(net, max_grad_norm=1.0)
    try:
        bk._pads[m] = lambda a: F.pad(a, (2, 2, 2, 2))  # a different padding than the forward's
        with pytest.raises(RuntimeError, match="Conv2dSame output .* `grad_sample_mode: hooks`"):
            net(x)
    finally:
        bk.remove_hooks()
