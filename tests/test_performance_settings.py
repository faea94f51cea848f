"""The GPU speed settings give the same training as without them (where they apply on a CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch import nn
from torch.utils.data import DataLoader

from dae.engine import DinoTrainer, SegmentationTrainer, Trainer
from dae.losses import DINOLoss
from dae.models import MultiCropWrapper
from dae.models.backbone2d import build_backbone
from dae.models.dino_head import DINOHead
from dae.utils.performance import backend_settings, channels_last, channels_last_module, compile_module

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3


def _losses(trainer: Trainer, batch: Any) -> list[float]:
    records = [(step + 1, trainer.train_step(batch)) for step in range(STEPS)]
    return [record["loss"] for _, record in trainer.read_records(records)]


def _segmentation(out: Path, **settings: Any) -> tuple[Trainer, Any]:
    torch.manual_seed(0)
    network = UNet(3, 1, 3, channels=(4, 8), strides=(2,), num_res_units=1)
    generator = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.rand(2, 1, 16, 16, 16, generator=generator),
        "label": torch.randint(0, 3, (2, 1, 16, 16, 16), generator=generator).float(),
    }
    trainer = SegmentationTrainer(
        network,
        DiceCELoss(to_onehot_y=True, softmax=True),
        # SGD: AdamW would blow the rounding noise of gradients that are zero in exact arithmetic up to lr.
        optimizer=torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.9),
        train_loader=DataLoader([batch]),
        output_dir=out,
        max_epochs=1,
        progress=False,
        **settings,
    )
    return trainer, batch


def _dino_resnet(out: Path, **settings: Any) -> tuple[Trainer, Any]:
    torch.manual_seed(0)

    def network() -> MultiCropWrapper:
        return MultiCropWrapper(build_backbone("resnet18", in_chans=3), DINOHead(512, 16, nlayers=1, bottleneck_dim=8))

    student = network()
    generator = torch.Generator().manual_seed(1)
    batch = {"crops": [torch.rand(2, 3, s, s, generator=generator) for s in (32, 32, 16, 16)]}
    trainer = DinoTrainer(
        student,
        network(),
        DINOLoss(16, 4, nepochs=1),
        optimizer=torch.optim.SGD(student.parameters(), lr=1e-2, momentum=0.9),
        train_loader=DataLoader([batch]),
        output_dir=out,
        max_epochs=1,
        progress=False,
        **settings,
    )
    return trainer, batch


def test_backend_settings_set_the_cudnn_and_tf32_flags() -> None:
    before = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.fp32_precision
    try:
        backend_settings(cudnn_benchmark=True, tf32=True)
        assert torch.backends.cudnn.benchmark
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" == torch.backends.cudnn.conv.fp32_precision
        backend_settings(cudnn_benchmark=False, tf32=False)
        assert not torch.backends.cudnn.benchmark
        assert torch.backends.cuda.matmul.fp32_precision == "ieee" == torch.backends.cudnn.conv.fp32_precision
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.fp32_precision = before


def test_channels_last_picks_the_layout_by_rank() -> None:
    module = channels_last_module(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv3d(3, 4, 3), nn.Linear(4, 5)))
    assert module[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert module[1].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert module[2].weight.is_contiguous()
    assert channels_last(torch.rand(2, 3, 4, 5, 6)).is_contiguous(memory_format=torch.channels_last_3d)
    assert channels_last(torch.rand(2, 3)).is_contiguous()


@pytest.mark.parametrize("build", [_segmentation, _dino_resnet], ids=["3d_segmentation", "2d_dino_resnet"])
def test_channels_last_trains_like_the_default_layout(tmp_path: Path, build: Any) -> None:
    reference, batch = build(tmp_path / "default")
    trainer, _ = build(tmp_path / "channels_last", channels_last=True)
    layouts = {4: torch.channels_last, 5: torch.channels_last_3d}
    weights = [p for p in trainer.model.parameters() if p.ndim in layouts]
    assert weights and all(p.is_contiguous(memory_format=layouts[p.ndim]) for p in weights)
    # Another summation order in the convolutions: rounding differences, amplified 25x by DINO's teacher temperature.
    torch.testing.assert_close(_losses(trainer, batch), _losses(reference, batch), rtol=1e-4, atol=1e-5)
    for a, b in zip(trainer.model.parameters(), reference.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_network_trains_like_the_eager_one(tmp_path: Path) -> None:
    reference, batch = _segmentation(tmp_path / "eager")
    trainer, _ = _segmentation(tmp_path / "compiled", compile=True)
    torch.testing.assert_close(_losses(trainer, batch), _losses(reference, batch), rtol=1e-4, atol=1e-5)
    assert set(trainer.model.state_dict()) == set(reference.model.state_dict())  # checkpoints keep their keys


def test_compile_module_is_in_place_and_off_by_request() -> None:
    module = nn.Linear(2, 2)
    assert compile_module(module, enabled=False) is module and module._compiled_call_impl is None
    assert compile_module(module) is module and module._compiled_call_impl is not None
