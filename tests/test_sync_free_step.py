"""The training step reads nothing back from the device: no `.item()`, `float()`, `bool()` ... in our code.

On a CPU every such read is free, so the CPU test records where they happen and fails on any call made from the
`dae` package during `Trainer.train_step` (torch's own reads of CPU-side values, e.g. AdamW's step counter,
are not ours and cost nothing on a GPU either). The CUDA test runs the same steps under
`torch.cuda.set_sync_debug_mode("error")`, which also catches synchronising torch calls (boolean indexing,
`nonzero`); it runs where a GPU is present.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader

import dae
from dae.data import CropAugment
from dae.disruptions import BatchDisruption
from dae.engine import DinoTrainer, PretrainTrainer, SegmentationTrainer, Trainer
from dae.losses import DAELoss, DINOLoss
from dae.models import DisruptiveAutoencoder, MultiCropWrapper
from dae.models.backbone2d import build_backbone
from dae.models.dino_head import DINOHead

pytestmark = pytest.mark.usefixtures("one_thread")

PACKAGE = str(Path(dae.__file__).parent)
#: modules whose reads are of tensors that live on the host by design (the CUDA test checks them on a GPU):
#: CropAugment draws its per-sample parameters on the CPU and decides on the CPU which steps to run.
HOST_SIDE = (str(Path(PACKAGE) / "data" / "device_augment.py"),)
READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "__format__")


@contextmanager
def reads_from_our_code() -> Iterator[list[str]]:
    """Record ``file:line`` of every host read of a tensor made directly from the ``dae`` package."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(PACKAGE) and caller.co_filename not in HOST_SIDE:
                calls.append(f"{name} from {caller.co_filename}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _pretrain(out: Path, device: str) -> tuple[Trainer, Any]:
    torch.manual_seed(0)
    network = DisruptiveAutoencoder(feature_size=12, proj_hidden_dim=16, proj_dim=8)
    batch = {"image": torch.rand(2, 1, 64, 64, 64), "modality_label": torch.tensor([0, 1])}
    trainer = PretrainTrainer(
        network,
        DAELoss(contrastive_weight=0.1),
        BatchDisruption("all", mask_patch_size=8),
        optimizer=torch.optim.AdamW(network.parameters(), lr=1e-4),
        train_loader=DataLoader([batch]),
        output_dir=out,
        max_epochs=1,
        device=device,
        progress=False,
    )
    return trainer, batch


def _dino(out: Path, device: str) -> tuple[Trainer, Any]:
    torch.manual_seed(0)

    def network() -> MultiCropWrapper:
        backbone = build_backbone("vit_tiny", patch_size=16, in_chans=3, img_size=32)
        return MultiCropWrapper(backbone, DINOHead(192, 16, nlayers=1, bottleneck_dim=8))

    student = network()
    # uint8 crops as the loader gives them, augmented and converted on the device
    batch = {"crops": [torch.randint(0, 256, (2, 1, s, s), dtype=torch.uint8) for s in (32, 32, 16, 16)]}
    trainer = DinoTrainer(
        student,
        network(),
        DINOLoss(16, 4, nepochs=2),
        optimizer=torch.optim.AdamW(student.parameters(), lr=1e-3),
        train_loader=DataLoader([batch]),
        output_dir=out,
        max_epochs=2,
        device=device,
        clip_grad=3.0,
        crop_transform=CropAugment("v1", augment=True, out_channels=3),
        progress=False,
    )
    return trainer, batch


def _segmentation(out: Path, device: str) -> tuple[Trainer, Any]:
    torch.manual_seed(0)
    network = nn.Conv3d(1, 3, 3, padding=1)
    batch = {"image": torch.rand(2, 1, 8, 8, 8), "label": torch.randint(0, 3, (2, 1, 8, 8, 8)).float()}
    trainer = SegmentationTrainer(
        network,
        DiceCELoss(to_onehot_y=True, softmax=True),
        optimizer=torch.optim.AdamW(network.parameters(), lr=1e-3),
        train_loader=DataLoader([batch]),
        output_dir=out,
        max_epochs=1,
        device=device,
        progress=False,
    )
    return trainer, batch


BUILDERS = {"pretrain": _pretrain, "dino": _dino, "segmentation": _segmentation}


@pytest.mark.parametrize("task", sorted(BUILDERS))
def test_the_step_reads_nothing_back_from_the_device(tmp_path: Path, task: str) -> None:
    trainer, batch = BUILDERS[task](tmp_path, "cpu")
    for log_step in (False, True):  # the diagnostics of log steps stay on the device too
        trainer.log_step = log_step
        with reads_from_our_code() as calls:
            record = trainer.train_step(batch)
        assert calls == []
        assert isinstance(record["loss"], torch.Tensor) and isinstance(record["grad_norm"], torch.Tensor)
    floats = trainer.read_records([(trainer.global_step, record)])
    assert all(isinstance(v, float) for v in floats[0][1].values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("task", sorted(BUILDERS))
def test_the_step_does_not_synchronise_the_gpu(tmp_path: Path, task: str) -> None:
    trainer, batch = BUILDERS[task](tmp_path, "cuda")
    trainer.train_step(batch)  # the first step initialises lazily (cuBLAS handles, autotuning)
    for log_step in (False, True):
        trainer.log_step = log_step
        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.train_step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
