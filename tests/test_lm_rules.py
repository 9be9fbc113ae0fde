"""Transformer per-example rules (dplit.privacy.transformer_rules) against per-example autograd on tiny GPT-2 and
Llama models: book-keeping (Conv1D, LayerNorm, LlamaRMSNorm, tied embeddings, units of K rows), Opacus hooks and
ghost with the registered Conv1D / LlamaRMSNorm rules, and the sensitivity of one unit."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.grad_sample.utils import prepare_module
from test_lm_causal import GPT2, LLAMA

from dplit.models.causal_lm import CausalLM
from dplit.privacy.bookkeeping import BookKeeping, uncovered_parameters
from dplit.privacy.coverage import UncoveredParameterError, check_coverage
from dplit.privacy.transformer_rules import register_opacus_rules
from dplit.tasks.causal_lm import TokenCrossEntropy

T = 6
MODELS = {
    "gpt2-tied": (GPT2, "all"),  # Conv1D, LayerNorm, wte tied to lm_head
    "llama-tied": ({**LLAMA, "tie_word_embeddings": True}, "all"),  # LlamaRMSNorm, tied
    "llama": ({**LLAMA, "tie_word_embeddings": False}, "all"),
    "gpt2-last": (GPT2, "last_k"),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (rows, T), generator=g)
    labels = ids.clone()
    labels[::3, T - 2 :] = -100  # some right padding
    return ids, labels


def _model(name: str) -> CausalLM:
    config, finetune = MODELS[name]
    return CausalLM(config=config, finetune=finetune, last_k=1)


def unit_grads(model: CausalLM, ids: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Reference [U, P]: per unit of K consecutive rows, the mean of its rows' own loss gradients (autograd)."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
    rows = []
    for i in range(len(ids)):
        loss = TokenCrossEntropy()(model(ids[i : i + 1]), labels[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows).reshape(len(ids) // k, k, -1).mean(1)


def bookkeeping_sum(model: CausalLM, ids: torch.Tensor, labels: torch.Tensor, k: int, c: float):
    bk = BookKeeping(model, c)
    bk.rows_per_unit = lambda n: k
    model.zero_grad(set_to_none=True)
    TokenCrossEntropy()(model(ids), labels).backward()
    bk.clip_into_grad()
    bk.remove_hooks()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    return grads, bk.last_norms


@pytest.mark.parametrize("k", [1, 2], ids=["rows", "units-of-2"])
@pytest.mark.parametrize("name", list(MODELS))
def test_bookkeeping_matches_per_unit_autograd(name: str, k: int):
    model = _model(name)
    assert not uncovered_parameters(model)
    ids, labels = _batch(4 * k)
    ref = unit_grads(model, ids, labels, k)
    norms = ref.norm(dim=1)
    c = float(norms.median())  # some units clipped, some not
    got, got_norms = bookkeeping_sum(model, ids, labels, k, c)
    torch.testing.assert_close(got_norms, norms, rtol=1e-4, atol=1e-6)
    expected = (ref * (c / norms).clamp(max=1.0)[:, None]).sum(0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2-tied", "llama-tied"])
def test_bookkeeping_one_unit_moves_the_sum_by_exactly_c(name: str):
    model = _model(name)
    ids, labels = _batch(6)
    with torch.no_grad():  # the first unit's rows get a huge gradient: its own embedding rows scaled up
        model.lm.get_input_embeddings().weight[ids[:2].unique()] *= 50
    c = 1e-3
    with_unit, norms = bookkeeping_sum(model, ids, labels, 2, c)
    assert float(norms[0]) > 100 * c
    without, _ = bookkeeping_sum(model, ids[2:], labels[2:], 2, c)
    assert float((with_unit - without).norm()) == pytest.approx(c, rel=1e-4)


def test_tied_weights_without_the_cross_term_would_be_wrong():
    """The cross term matters: per-use norms (each layer's own) differ from the norm of the tied weight's sum."""
    model = _model("gpt2-tied")
    ids, labels = _batch(4)
    wte = model.lm.get_input_embeddings().weight
    params = [p for p in model.parameters() if p.requires_grad]
    idx = next(i for i, p in enumerate(params) if p is wte)
    with_cross = unit_grads(model, ids, labels, 1)
    start = sum(p.numel() for p in params[:idx])
    tied = with_cross[:, start : start + wte.numel()]
    emb_only = []  # the embedding's own contribution: gradient with the head detached
    head = model.lm.get_output_embeddings()
    for i in range(4):
        w = head.weight
        head.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=False)
        loss = TokenCrossEntropy()(model(ids[i : i + 1]), labels[i : i + 1])
        emb_only.append(torch.autograd.grad(loss, wte)[0].reshape(-1))
        head.weight = w
    emb = torch.stack(emb_only)
    head_part = tied - emb
    per_use = (emb.norm(dim=1) ** 2 + head_part.norm(dim=1) ** 2).sqrt()
    assert not torch.allclose(per_use, tied.norm(dim=1), rtol=1e-3)


def test_bookkeeping_refuses_what_it_cannot_clip():
    model = _model("llama")
    model.lm.model.norm.extra = torch.nn.Parameter(torch.ones(2))  # a parameter outside the LlamaRMSNorm rule
    with pytest.raises(UncoveredParameterError, match=r"norm.*parameters outside the LlamaRMSNorm rule: extra"):
        check_coverage(model, "bookkeeping")
    tied = _model("gpt2-tied")
    with pytest.raises(UncoveredParameterError, match=r"wte.weight.*Opacus. ghost.*`grad_sample_mode: bookkeeping`"):
        check_coverage(tied, "ghost")
    three = _model("llama")
    three.lm.lm_head.weight = three.lm.model.embed_tokens.weight
    three.extra_head = torch.nn.Linear(32, 128, bias=False)
    three.extra_head.weight = three.lm.model.embed_tokens.weight
    with pytest.raises(UncoveredParameterError, match=r"only an nn.Embedding tied to one nn.Linear"):
        check_coverage(three, "bookkeeping")


def _opacus_norms_and_grads(model: CausalLM, mode: str, ids: torch.Tensor, labels: torch.Tensor):
    register_opacus_rules(model)
    gsm = prepare_module(model, grad_sample_mode=mode, wrap_model=False, batch_first=True, loss_reduction="mean",
                         strict=True, **({"max_grad_norm": 1.0} if mode == "ghost" else {}))  # fmt: skip
    loss = TokenCrossEntropy()(model(ids), labels)
    loss.backward()
    if mode == "ghost":
        norms = gsm.get_norm_sample()
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        norms = torch.cat([p.grad_sample.reshape(len(ids), -1) for p in params], dim=1).norm(dim=1)
    gsm.remove_hooks()
    return norms


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("name", ["llama", "gpt2-last"])
def test_opacus_uses_the_registered_rules_and_matches_autograd(name: str, mode: str):
    model = _model(name)
    ids, labels = _batch(4)
    ref = unit_grads(model, ids, labels, 1)
    norms = _opacus_norms_and_grads(model, mode, ids, labels)
    torch.testing.assert_close(norms, ref.norm(dim=1), rtol=1e-4, atol=1e-6)
    kinds = {type(m).__name__: type(m) for m in model.modules()}
    rule = kinds.get("Conv1D") or kinds["LlamaRMSNorm"]
    assert rule in GradSampleModule.GRAD_SAMPLERS  # not the torch.func fallback
    if "Conv1D" in kinds:
        assert kinds["Conv1D"] in GradSampleModuleFastGradientClipping.NORM_SAMPLERS
