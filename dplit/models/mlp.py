"""TabularMLP: an MLP for tabular features, optionally initialised from a pretrained (source-domain) checkpoint.

Transfer learning without DP code: the source-domain model is trained by an ordinary, non-private ``dplit fit``
(the source domain is assumed public) that saves a checkpoint; the target config names that checkpoint in
``init_from``. The weights are loaded here, when the backbone is built, i.e. before any callback runs, so the
DifferentialPrivacy callback wraps an already initialised model and only the target-domain fine-tuning is private.
``finetune: head`` freezes every layer but the last (``requires_grad=False``): frozen parameters are neither clipped
nor noised, and the optimiser only sees the head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn


class TabularMLP(nn.Module):
    """``Linear -> ReLU (-> Dropout)`` blocks and a linear head; no BatchNorm (DP-compatible, book-keeping covered).

    Args:
        in_features: Input width; linked from the DataModule's ``num_features`` by the CLI.
        num_classes: Output classes; linked from the DataModule.
        hidden: Widths of the hidden layers.
        dropout: Dropout after each hidden layer (0: none).
        init_from: A Lightning checkpoint (``.ckpt``) of a task with this backbone, or a bare ``state_dict`` file,
            to initialise from (transfer); None trains from scratch.
        finetune: ``all`` layers, or the ``head`` only (the body is frozen).
    """

    def __init__(
        self,
        in_features: int | None = None,
        num_classes: int = 2,
        hidden: list[int] | None = None,
        dropout: float = 0.0,
        init_from: str | None = None,
        finetune: Literal["all", "head"] = "all",
    ) -> None:
        super().__init__()
        if in_features is None or in_features < 1:
            raise ValueError(f"TabularMLP needs in_features >= 1 (linked from data.num_features), got {in_features}")
        if finetune not in ("all", "head"):
            raise ValueError(f"finetune must be 'all' or 'head', got {finetune!r}")
        if finetune == "head" and init_from is None:
            raise ValueError("finetune: head trains only the last layer: it needs init_from (a pretrained checkpoint)")
        widths = [in_features, *(hidden if hidden is not None else [128, 64])]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], num_classes)
        self.init_from, self.finetune = init_from, finetune
        if init_from is not None:
            self.load_pretrained(init_from)
        if finetune == "head":
            self.body.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))  # [B, num_classes]

    def load_pretrained(self, path: str | Path) -> None:
        """Loads this backbone's weights from a task checkpoint (keys ``backbone.*``) or a bare state dict."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"init_from: {path} does not exist. Pretrain on the public source domain first (e.g. "
                "`dplit fit --config configs/credit_source_nodp.yaml`), or set init_from: null to train from scratch"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        prefix = "backbone."
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        own = self.state_dict()
        shapes = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own}
        wrong = {k: s for k, s in shapes.items() if s[0] != s[1]}
        if set(state) != set(own) or wrong:
            raise ValueError(
                f"init_from: {path} does not fit this TabularMLP (missing {sorted(set(own) - set(state))}, "
                f"unexpected {sorted(set(state) - set(own))}, shape mismatches checkpoint vs model {wrong}); the "
                "source and target must share the feature encoding (columns) and the hidden widths"
            )
        self.load_state_dict(state)


__all__ = ["TabularMLP"]
