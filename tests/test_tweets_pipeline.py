"""The tweets task end to end: TweetsDataModule + BiLSTM (GloVe, public vocabulary) + DP callback + group metrics."""

from __future__ import annotations

import csv
from functools import partial

import lightning as L
import pytest
import torch

from dplit.callbacks import DifferentialPrivacy, SubgroupMetrics
from dplit.data import TweetsDataModule
from dplit.models import BiLSTMClassifier
from dplit.tasks import ClassificationTask


def _fit(tmp_path, tweets_root, mode: str | None, epochs: int = 6):
    L.seed_everything(0, verbose=False)
    data = TweetsDataModule(
        root=str(tweets_root),
        train_sizes={"SAE": 200, "AAE": 40},
        val_per_cell=20,
        test_per_cell=20,
        max_len=16,
        batch_size=40,
        cache_dir=str(tmp_path / "cache"),
    )
    backbone = BiLSTMClassifier(hidden_size=16, max_words=5000, oov_buckets=50)
    task = ClassificationTask(backbone, optimizer=partial(torch.optim.Adam, lr=0.02))
    callbacks: list = [SubgroupMetrics()]
    dp = None
    if mode is not None:
        dp = DifferentialPrivacy(
            noise_multiplier=0.5, max_grad_norm=1.0, delta=1e-3, grad_sample_mode=mode, insecure_testing_seed=0
        )
        callbacks.append(dp)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name=mode or "nodp"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule=data)
    rows = list(csv.DictReader(open(next(tmp_path.glob(f"{mode or 'nodp'}/version_0/metrics.csv")))))
    return dp, rows, backbone, data


def test_dp_bilstm_learns_sentiment_and_logs_dialect_groups(tmp_path, tweets_root):
    dp, rows, backbone, data = _fit(tmp_path, tweets_root, "bookkeeping", epochs=10)
    val = [r for r in rows if r.get("val/acc")]
    assert len(val) == 10
    last = val[-1]
    for group in ("SAE", "AAE"):
        assert float(last[f"val/count/group={group}"]) == 40  # 20 happy + 20 sad validation tweets each
        assert 0.0 <= float(last[f"val/acc/group={group}"]) <= 1.0
    # sentiment words are in the public GloVe vocabulary: learnable under DP (non-DP reaches 0.99 here)
    assert max(float(r["val/acc"]) for r in val[-3:]) > 0.8
    assert float(val[0]["val/acc"]) < 0.7
    assert dp is not None and dp.accountant.steps == 10 * 6 and dp.epsilon > 0
    final = [r for r in rows if r.get("privacy/epsilon")][-1]
    assert float(final["privacy/epsilon"]) == pytest.approx(dp.epsilon, rel=1e-6)
    # the fixture's sentiment words are GloVe words; AAE spellings ("finna", "bruh", ...) may fall in OOV buckets
    x = data._datasets()["train"].x
    assert isinstance(x, torch.Tensor)
    assert 0.0 < backbone.embedding.oov_rate(x) < 0.3


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_modes_and_bookkeeping_train_the_same_model(tmp_path, tweets_root, mode):
    """Independent per-example paths (Opacus hooks or ghost clipping, with the LSTM's einsum rule and Opacus' dense
    embedding rule; book-keeping with ghost norms and sparse embedding norms), same sampling and noise: same model."""
    _, _, hooks_model, _ = _fit(tmp_path / "a", tweets_root, mode, epochs=1)
    _, _, bk_model, _ = _fit(tmp_path / "b", tweets_root, "bookkeeping", epochs=1)
    _, _, nodp_model, _ = _fit(tmp_path / "c", tweets_root, None, epochs=1)
    L.seed_everything(0, verbose=False)
    init = BiLSTMClassifier(hidden_size=16, max_words=5000, oov_buckets=50)  # the same initial weights
    for (name, p), q, r, p0 in zip(
        hooks_model.named_parameters(), bk_model.parameters(), nodp_model.parameters(), init.parameters()
    ):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
        assert (p - p0).abs().max() > 1e-3, name  # trained
        assert (p - r).abs().max() > 1e-3, name  # and not as without DP


def test_padding_rows_never_change(tmp_path, tweets_root):
    """DP noise is added to every embedding row, the padding row too; padded positions must still read zeros."""
    _, _, backbone, data = _fit(tmp_path, tweets_root, "bookkeeping", epochs=1)
    with torch.no_grad():
        out = backbone.embedding(torch.zeros(2, 5, dtype=torch.int64))
    assert out.abs().max() == 0


def test_functorch_mode_is_refused_with_the_alternatives(tmp_path, tweets_root):
    from dplit.privacy.compat import IncompatibleModelError

    with pytest.raises(IncompatibleModelError, match=r"functorch.*lstm\.hh\.0.*bookkeeping"):
        _fit(tmp_path, tweets_root, "functorch", epochs=1)
