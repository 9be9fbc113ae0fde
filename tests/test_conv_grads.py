"""Per-example Conv2d gradients (dplit.privacy.conv_grads) against per-example autograd (torch.func vmap/grad), and
book-keeping's conv path: parameters hidden from autograd, grouped convolutions, a first layer without bias."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from dplit.privacy import conv_grads
from dplit.privacy.bookkeeping import BookKeeping, check_supported
from dplit.privacy.conv_grads import conv_per_example, per_example_weight_grads, write_clipped

# (in, out, kernel, stride, padding, dilation, groups, bias, padding_mode)
LAYERS = {
    "plain": (2, 3, 3, 1, 0, 1, 1, True, "zeros"),
    "stride2-pad1": (2, 4, (3, 2), 2, 1, 1, 1, True, "zeros"),
    "asym-stride-pad": (3, 2, (2, 3), (2, 1), (2, 1), 1, 1, False, "zeros"),
    "dilation2": (2, 3, 3, 1, 2, 2, 1, True, "zeros"),
    "dilation-stride": (2, 3, (2, 3), (1, 2), 1, (2, 1), 1, True, "zeros"),
    "same": (2, 3, (3, 2), 1, "same", 2, 1, True, "zeros"),
    "valid": (2, 3, 3, 1, "valid", 1, 1, False, "zeros"),
    "groups2": (4, 6, 3, 1, 1, 1, 2, True, "zeros"),
    "depthwise-stride": (3, 6, 3, 2, 1, 1, 3, True, "zeros"),
    "reflect": (2, 3, 3, 1, 1, 1, 1, True, "reflect"),
    "replicate-groups": (4, 2, (3, 2), 1, (2, 1), 1, 2, True, "replicate"),
    "circular-stride-dil": (2, 3, 3, 2, 2, 2, 1, False, "circular"),
}


def _layer(spec: tuple) -> nn.Conv2d:
    cin, cout, k, s, p, d, g, bias, mode = spec
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=bias, padding_mode=mode).double()


def _reference(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example parameter gradients of <m(a_i), g_i> (whose gradient in the output is g_i), by vmap(grad)."""
    params = {k: v.detach() for k, v in m.named_parameters()}

    def inner(p: dict[str, torch.Tensor], x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
        return (functional_call(m, p, (x[None],))[0] * gy).sum()

    return vmap(grad(inner), in_dims=(None, 0, 0))(params, a, g)


@pytest.mark.parametrize("name", list(LAYERS))
def test_per_example_conv_gradients_match_vmap_autograd(name):
    torch.manual_seed(0)
    m = _layer(LAYERS[name])
    a = torch.randn(5, m.in_channels, 7, 6, dtype=torch.double)
    g = torch.randn_like(m(a))
    ref = _reference(m, a, g)
    for method in ("patches", "grouped"):
        w = per_example_weight_grads(m, a, g, method=method)
        torch.testing.assert_close(w, ref["weight"].flatten(2), msg=f"{method}")
    expected_sq = sum(v.flatten(1).pow(2).sum(1) for v in ref.values())
    coef = torch.rand(5, dtype=torch.double)
    for keep in (True, False):  # the clipped sum from kept per-example gradients, or recomputed from a and g
        per = conv_per_example(m, a, g, keep=keep)
        assert (per.weight is not None, per.recompute) == (keep, not keep)
        torch.testing.assert_close(per.weight, ref["weight"].flatten(2) if keep else None)
        torch.testing.assert_close(per.bias, ref.get("bias"))
        torch.testing.assert_close(per.sq, expected_sq)
        m.zero_grad(set_to_none=True)
        write_clipped(m, per, None if keep else a, None if keep else g, coef)
        for k, p in m.named_parameters():
            torch.testing.assert_close(p.grad, torch.einsum("n,n...->...", coef, ref[k]))


# (layer spec as in LAYERS, input H, W): few output positions, so ghost norms are cheaper than the gradients
GHOST = {
    "pointwise": ((16, 24, 1, 1, 0, 1, 1, True, "zeros"), (2, 2)),
    "pointwise-stride2": ((12, 20, 1, 2, 0, 1, 1, False, "zeros"), (3, 4)),
    "3x3-same-small-map": ((8, 8, 3, 1, 1, 1, 1, True, "zeros"), (2, 2)),
    "3x3-reflect-stride": ((6, 10, 3, 2, 1, 1, 1, True, "reflect"), (3, 3)),
}


@pytest.mark.parametrize("name", list(GHOST))
def test_ghost_norms_of_small_maps_match_vmap_autograd(name, monkeypatch):
    """Few output positions: the per-example norms come from the ghost identity over input patches (no gradient
    formed, the clipped sum recomputed), equal to per-example autograd's; in one chunk and example by example."""
    torch.manual_seed(4)
    spec, (h, w) = GHOST[name]
    m = _layer(spec)
    a = torch.randn(7, m.in_channels, h, w, dtype=torch.double)
    g = torch.randn_like(m(a))
    ref = _reference(m, a, g)
    expected_sq = sum(v.flatten(1).pow(2).sum(1) for v in ref.values())
    coef = torch.rand(7, dtype=torch.double)

    def formed(*args, **kwargs):
        raise AssertionError("per-example gradients formed: the ghost path was not taken")

    monkeypatch.setattr(conv_grads, "per_example_weight_grads", formed)
    for chunk in (conv_grads.CHUNK_BYTES, 1):
        monkeypatch.setattr(conv_grads, "CHUNK_BYTES", chunk)
        per = conv_per_example(m, a, g)
        assert per.weight is None and per.recompute  # the ghost path: no per-example gradient kept
        torch.testing.assert_close(per.sq, expected_sq)
        m.zero_grad(set_to_none=True)
        write_clipped(m, per, a, g, coef)
        for k, p in m.named_parameters():
            torch.testing.assert_close(p.grad, torch.einsum("n,n...->...", coef, ref[k]))


def test_chunks_of_examples_give_the_same_norms(monkeypatch):
    torch.manual_seed(1)
    m = _layer(LAYERS["dilation-stride"])
    a = torch.randn(9, m.in_channels, 7, 6, dtype=torch.double)
    g = torch.randn_like(m(a))
    whole = conv_per_example(m, a, g, keep=True)
    monkeypatch.setattr(conv_grads, "CHUNK_BYTES", 1)  # one example a chunk
    chunked = conv_per_example(m, a, g, keep=True)
    torch.testing.assert_close(chunked.sq, whole.sq)
    torch.testing.assert_close(chunked.weight, whole.weight)


def test_a_frozen_weight_leaves_only_the_bias_and_an_unknown_method_is_refused():
    m = _layer(LAYERS["plain"]).requires_grad_(False)
    m.bias.requires_grad_(True)
    a = torch.randn(3, 2, 5, 5, dtype=torch.double)
    g = torch.randn_like(m(a))
    per = conv_per_example(m, a, g)
    assert per.weight is None and not per.recompute and per.bias is not None
    with pytest.raises(ValueError, match="method must be"):
        per_example_weight_grads(m, a, g, method="im2col")


def _per_example_clipped_sum(net: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    params = {k: v.detach() for k, v in net.named_parameters() if v.requires_grad}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(functional_call(net, p, (xi[None],)), yi[None])

    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([v.flatten(1) for v in per.values()], 1)  # [n, P]
    return (flat * (c / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)[:, None]).sum(0)


@pytest.mark.parametrize("first_bias", [True, False], ids=["bias", "no-bias"])
def test_bookkeeping_grouped_convs_and_a_first_layer_hidden_from_autograd_are_exact(first_bias):
    """Every conv parameter is hidden from autograd during the forward (no summed gradient formed; the first
    layer's output made a leaf that requires grad so its output gradient is still captured): the clipped sum equals
    per-example autograd's, grouped and depthwise convolutions included, kept per-example gradients (the first
    layers) and the clipped sum recomputed from the captures (the last conv) alike."""
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=first_bias),
        nn.Tanh(),
        nn.Conv2d(4, 6, 3, stride=2, groups=2, padding_mode="reflect", padding=1),
        nn.Tanh(),
        nn.Conv2d(6, 6, 2, groups=6, dilation=2),
        nn.Tanh(),
        nn.Conv2d(6, 8, 2),  # [6, 2, 2] -> [8, 1, 1]: per-example gradients larger than a and g, recomputed
        nn.Flatten(),
        nn.LazyLinear(2),
    ).double()
    x = torch.randn(6, 2, 8, 8, dtype=torch.double)
    net(x)  # materialise the lazy head
    y = torch.randn(6, 2, dtype=torch.double) * torch.logspace(-2, 2, 6, dtype=torch.double)[:, None]
    check_supported(net)  # grouped convolutions are covered
    c = 0.05
    expected = _per_example_clipped_sum(net, x, y, c)
    bk = BookKeeping(net, max_grad_norm=c)
    try:
        F.mse_loss(net(x), y).backward()
        convs = [m for m in net if isinstance(m, nn.Conv2d)]
        assert all(p.grad is None for m in convs for p in m.parameters())  # autograd formed no conv gradient
        assert all(p.requires_grad for p in net.parameters())  # the flags are restored after each forward
        bk.clip_into_grad()
    finally:
        bk.remove_hooks()
    got = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(got, expected)
    assert (bk.last_norms > c).sum() >= 3  # most examples clipped: the factors matter


# (layer spec, input H, W, ghost norms expected for units of 3 rows: 3 L (D + out) < out D)
UNIT_CASES = {
    "plain": (LAYERS["plain"], (7, 6), False),
    "groups2": (LAYERS["groups2"], (7, 6), False),
    "pointwise-ghost": ((32, 48, 1, 1, 0, 1, 1, True, "zeros"), (2, 2), True),
    "3x3-small-map-ghost": ((16, 16, 3, 1, 1, 1, 1, False, "zeros"), (2, 2), True),
}


@pytest.mark.parametrize("case", list(UNIT_CASES))
def test_units_of_k_rows_match_the_sum_of_their_rows_autograd_gradients(case, monkeypatch):
    """Augmentation multiplicity: a unit's gradient is the sum of its K rows' (vmap autograd, summed by hand), on the
    kept, recomputed and ghost paths, in one chunk and unit by unit."""
    torch.manual_seed(5)
    k, units = 3, 4
    spec, (h, w), ghost = UNIT_CASES[case]
    m = _layer(spec)
    a = torch.randn(units * k, m.in_channels, h, w, dtype=torch.double)
    g = torch.randn_like(m(a))
    ref = {name: t.reshape(units, k, *t.shape[1:]).sum(1) for name, t in _reference(m, a, g).items()}
    expected_sq = sum(v.flatten(1).pow(2).sum(1) for v in ref.values())
    coef = torch.rand(units, dtype=torch.double)
    formed = []
    real = conv_grads.per_example_weight_grads
    monkeypatch.setattr(conv_grads, "per_example_weight_grads", lambda *x, **kw: formed.append(1) or real(*x, **kw))
    for chunk in (conv_grads.CHUNK_BYTES, 1):
        monkeypatch.setattr(conv_grads, "CHUNK_BYTES", chunk)
        for keep in (True, False, None):
            formed.clear()
            per = conv_per_example(m, a, g, keep=keep, rows_per_unit=k)
            assert bool(formed) == (keep is True or not ghost)  # ghost: no per-example gradient formed
            if keep:
                torch.testing.assert_close(per.weight, ref["weight"].flatten(2))
            torch.testing.assert_close(per.sq, expected_sq)
            torch.testing.assert_close(per.bias, ref.get("bias"))
            m.zero_grad(set_to_none=True)
            write_clipped(m, per, a, g, coef)
            for name, p in m.named_parameters():
                torch.testing.assert_close(p.grad, torch.einsum("n,n...->...", coef, ref[name]))
    with pytest.raises(ValueError, match="units of 5 rows"):
        conv_per_example(m, a, g, rows_per_unit=5)


@pytest.mark.parametrize("k", [1, 3], ids=["examples", "units-of-3"])
@pytest.mark.parametrize("chunk", ["whole", "one-unit"])
def test_deferred_weights_get_norms_and_clipped_sums_in_one_pass(k, chunk, monkeypatch):
    """conv_per_example(defer=True) forms nothing for a weight it would otherwise recompute; clip_deferred then forms
    each chunk's per-unit gradients once, completes the norms and writes the clipped sums: equal to vmap autograd
    (rows summed per unit), the per-unit factor min(1, C / norm) taken from the whole-model norm."""
    torch.manual_seed(7)
    units = 5
    layers = [  # per-example gradients larger than the captures, no ghost norms: deferred (units: keep=False)
        (nn.Conv2d(4, 8, 3).double(), (6, 6)),
        (nn.Conv2d(3, 32, 3, stride=2, padding=1, padding_mode="reflect").double(), (8, 8)),
    ]
    rows = []
    formed = []
    real = conv_grads.per_example_weight_grads
    monkeypatch.setattr(conv_grads, "per_example_weight_grads", lambda m, a, g: formed.append(len(a)) or real(m, a, g))
    if chunk == "one-unit":
        monkeypatch.setattr(conv_grads, "CHUNK_BYTES", 1)
    for m, (h, w) in layers:
        a = torch.randn(units * k, m.in_channels, h, w, dtype=torch.double)
        g = torch.randn_like(m(a))
        per = conv_per_example(m, a, g, keep=False if k > 1 else None, rows_per_unit=k, defer=True)
        assert per.deferred and not per.recompute and per.weight is None
        ref = {n: t.reshape(units, k, *t.shape[1:]).sum(1) for n, t in _reference(m, a, g).items()}
        rows.append((m, a, g, per, ref))
    assert not formed  # nothing formed before the norms of the other layers are known
    scale = 2.0  # the captures are 1 / scale of each unit's gradient (a mean loss)
    other = torch.rand(units, dtype=torch.double)  # the rest of the model's squared norms
    sq = other + sum(per.sq.double() for _, _, _, per, _ in rows) * scale**2  # the biases' norms
    c = 0.5

    def coef_of(norms: torch.Tensor, units: slice | None = None) -> torch.Tensor:
        if units is not None:
            slices.append((units.start, units.stop))
        return (c / (norms + 1e-6)).clamp(max=1.0)

    slices: list[tuple[int, int]] = []
    used = conv_grads.clip_deferred([(m, a, g) for m, a, g, _, _ in rows], sq, scale, coef_of, rows_per_unit=k)
    expected_sq = other + scale**2 * sum(sum(t.flatten(1).pow(2).sum(1) for t in ref.values()) for *_, ref in rows)
    torch.testing.assert_close(sq, expected_sq)
    coef = coef_of(expected_sq.sqrt())
    torch.testing.assert_close(used, coef)
    assert slices == ([(0, units)] if chunk == "whole" else [(i, i + 1) for i in range(units)])  # the units' slices
    assert (coef < 1).sum() >= 2  # the factors matter
    for m, _, _, _, ref in rows:
        torch.testing.assert_close(m.weight.grad, torch.einsum("n,n...->...", coef * scale, ref["weight"]))
    assert sum(formed) == 2 * units * k  # every row's gradient formed once per layer: no recomputation


@pytest.mark.parametrize("factors", ["own", "whole-batch", "elementwise", "elementwise-wrong"])
def test_bookkeeping_defers_a_large_conv_only_to_elementwise_factors(factors, monkeypatch):
    """A conv whose per-example gradients are larger than its captures is clipped in one pass (clip_deferred) with
    book-keeping's own factors or a DP algorithm's declared elementwise ones; with only whole-batch factors it is
    recomputed; if the elementwise factors differ from the batch's (a wrong declaration), the weight is recomputed
    with the batch's. Every case equals per-example autograd's clipped sum, and the batch's factors are asked for
    exactly once."""
    torch.manual_seed(11)
    net = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),  # [8, 8, 8] -> [16, 4, 4]: 1,152 weights an example > a + g
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(256, 2),
    ).double()
    x = torch.randn(7, 2, 8, 8, dtype=torch.double)
    y = torch.randn(7, 2, dtype=torch.double) * torch.logspace(-2, 2, 7, dtype=torch.double)[:, None]
    c = 0.05
    expected = _per_example_clipped_sum(net, x, y, c)
    deferred, recomputed, asked = [], [], []
    real_defer, real_recompute = conv_grads.clip_deferred, conv_grads.recompute_weight
    monkeypatch.setattr(
        "dplit.privacy.bookkeeping.clip_deferred",
        lambda layers, *rest: deferred.extend(layers) or real_defer(layers, *rest),
    )
    monkeypatch.setattr(
        "dplit.privacy.bookkeeping.recompute_weight", lambda m, *rest: recomputed.append(m) or real_recompute(m, *rest)
    )
    bk = BookKeeping(net, max_grad_norm=c)
    flat = lambda norms: (c / (norms + 1e-6)).clamp(max=1.0)  # noqa: E731
    if factors != "own":
        bk.clip_factors = lambda norms: asked.append(len(norms)) or flat(norms)
    if factors == "elementwise":
        bk.chunk_factors = lambda norms, units, total: flat(norms)
    if factors == "elementwise-wrong":
        bk.chunk_factors = lambda norms, units, total: torch.ones_like(norms)  # not the batch's: no clipping at all
    try:
        F.mse_loss(net(x), y).backward()
        bk.clip_into_grad()
    finally:
        bk.remove_hooks()
    assert [m for m, _, _ in deferred] == ([] if factors == "whole-batch" else [net[2]])
    assert recomputed == ([net[2]] if factors == "elementwise-wrong" else [])  # whole-batch: write_clipped's own
    assert asked == ([] if factors == "own" else [7])
    got = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(got, expected)
    assert (bk.last_norms > c).sum() >= 3
