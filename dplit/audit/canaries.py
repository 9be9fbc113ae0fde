"""Canaries for one-run auditing: mislabelled training examples, each trained on with probability 1/2."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from typing_extensions import override


class AuditError(ValueError):
    """The audit cannot run as asked (the message names the flag or the requirement)."""


class _Items(Dataset):
    """A list of ready-made ``(x, y, group)`` items."""

    def __init__(self, items: list[tuple[Any, Tensor, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, Tensor, Any]:
        return self.items[index]


class CanaryDataModule(L.LightningDataModule):
    """Wraps a dplit DataModule: ``canaries`` training examples become mislabelled canaries, half trained on.

    ``canaries`` examples of the wrapped training set are drawn at random (seeded) and removed from it; each gets
    a random wrong label ``(y + U{1..C-1}) mod C`` and keeps its input and group, and each is put back into the
    training set independently with probability 1/2 (``included``). An excluded canary is thus an example the model
    never saw; an included one can only be fitted by memorising it. Validation/test/predict loaders, ``group_names``,
    ``num_classes`` and every other attribute come from the wrapped DataModule.

    ``train_dataloader`` is an ordinary shuffled ``DataLoader`` with the wrapped loader's ``batch_size`` (and
    collate function), so the DifferentialPrivacy callback Poisson-samples it like any other; its N counts the
    included canaries.

    Args:
        datamodule: the DataModule to audit; its train loader yields ``(x, y, group)`` with an integer class ``y``.
        canaries: number of canaries m, between 1 and the training-set size.
        seed: seed of the canary choice, their wrong labels and their inclusion.
    """

    def __init__(self, datamodule: L.LightningDataModule, canaries: int, seed: int = 0) -> None:
        super().__init__()
        if canaries < 1:
            raise AuditError(f"--canaries must be >= 1, got {canaries}")
        self.datamodule = datamodule
        self.canaries = canaries
        self.seed = seed
        self.canary_indices: Tensor | None = None  # [m] indices into the wrapped training set
        self.labels: Tensor | None = None  # [m] the wrong labels
        self.included: Tensor | None = None  # [m] bool
        self.canary_dataset: Dataset | None = None  # all m canaries, with their wrong labels
        self._train: Dataset | None = None
        self._template: DataLoader | None = None

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("datamodule")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)  # group_names, num_classes, group_attributes, ...

    @override
    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    @override
    def setup(self, stage: str) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)
        if stage == "fit" and self._train is None:
            self._build()

    def _build(self) -> None:
        loader = self.datamodule.train_dataloader()
        if not isinstance(loader, DataLoader) or loader.batch_size is None:
            raise AuditError(
                f"{type(self.datamodule).__name__}.train_dataloader must return a DataLoader built with `batch_size`."
            )
        dataset = loader.dataset
        n = len(dataset)  # type: ignore[arg-type]
        if self.canaries > n:
            raise AuditError(f"--canaries {self.canaries} is more than the {n} training examples; use at most {n}.")
        num_classes = getattr(self.datamodule, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise AuditError(
                f"mislabelled canaries need a classification DataModule with `num_classes` >= 2; "
                f"{type(self.datamodule).__name__} has num_classes={num_classes!r}."
            )
        g = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(n, generator=g)[: self.canaries]  # [m]
        shift = torch.randint(1, num_classes, (self.canaries,), generator=g)  # [m], never 0: the label changes
        self.included = torch.randint(0, 2, (self.canaries,), generator=g).bool()  # [m]
        items, labels = [], []
        for index, offset in zip(chosen.tolist(), shift.tolist(), strict=True):
            x, y, group = dataset[index]
            y = torch.as_tensor(y)
            if y.dim() != 0 or y.is_floating_point():
                raise AuditError(f"canaries need an integer class label per example; got y of shape {tuple(y.shape)}")
            wrong = (y + offset) % num_classes
            items.append((x, wrong, group))
            labels.append(int(wrong))
        self.canary_indices = chosen
        self.labels = torch.tensor(labels)
        self.canary_dataset = _Items(items)
        keep = torch.ones(n, dtype=torch.bool)
        keep[chosen] = False
        in_canaries = self.included.nonzero().flatten().tolist()
        self._train = ConcatDataset(
            [Subset(dataset, keep.nonzero().flatten().tolist()), Subset(self.canary_dataset, in_canaries)]
        )
        self._template = loader

    @override
    def train_dataloader(self) -> DataLoader:
        """The training set without the canaries' originals, plus the included canaries; shuffled batches."""
        if self._train is None or self._template is None:
            raise RuntimeError("CanaryDataModule.setup('fit') must run before train_dataloader()")
        t = self._template
        return DataLoader(
            self._train,
            batch_size=t.batch_size,
            shuffle=True,
            collate_fn=t.collate_fn,
            num_workers=t.num_workers,
            pin_memory=t.pin_memory,
            persistent_workers=t.persistent_workers,
        )

    def canary_loader(self, batch_size: int = 512) -> DataLoader:
        """All m canaries, with their wrong labels, in canary order (for scoring)."""
        if self.canary_dataset is None or self._template is None:
            raise RuntimeError("CanaryDataModule.setup('fit') must run before canary_loader()")
        return DataLoader(self.canary_dataset, batch_size=batch_size, collate_fn=self._template.collate_fn)

    @override
    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    @override
    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    @override
    def predict_dataloader(self) -> Any:
        return self.datamodule.predict_dataloader()

    @override
    def teardown(self, stage: str) -> None:
        self.datamodule.teardown(stage)

    @override
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return self.datamodule.transfer_batch_to_device(batch, device, dataloader_idx)

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.datamodule.on_before_batch_transfer(batch, dataloader_idx)

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.datamodule.on_after_batch_transfer(batch, dataloader_idx)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)


@torch.no_grad()
def canary_scores(model: nn.Module, datamodule: CanaryDataModule, batch_size: int = 512) -> Tensor:
    """Membership scores [m]: minus the model's loss on each canary's wrong label (low loss: likely trained on).

    The loss is the cross-entropy of the model's logits ``model(x)`` ([B, C]; or [B] / [B, 1] for a binary
    logit, then binary cross-entropy).
    """
    loader = datamodule.canary_loader(batch_size)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    losses = []
    try:
        for x, y, _group in loader:
            logits = model(move_data_to_device(x, device)).float()
            y = y.to(device)
            if logits.dim() == 1 or logits.shape[-1] == 1:  # one binary logit
                loss = nn.functional.binary_cross_entropy_with_logits(logits.reshape(-1), y.float(), reduction="none")
            else:  # [B, C]
                loss = nn.functional.cross_entropy(logits, y, reduction="none")
            losses.append(loss.cpu())
    finally:
        model.train(was_training)
    return -torch.cat(losses)
