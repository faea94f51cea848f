"""Reading DINO, DAX, DINOv2-style and our DINO checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from dae.models.backbone2d import backbone_config, build_backbone
from dae.models.dino_checkpoint import load_backbone, load_dino_wrapper_state, normalize_dino_keys, read_dino_checkpoint
from dae.models.dino_head import DINOHead
from dae.models.multicrop import MultiCropWrapper

OUT_DIM = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def _wrapper(arch: str = "vit_tiny", use_bn: bool = False, seed: int = 0) -> MultiCropWrapper:
    torch.manual_seed(seed)
    backbone = build_backbone(arch, patch_size=16, img_size=64)
    head = DINOHead(backbone.embed_dim, OUT_DIM, use_bn=use_bn, hidden_dim=96, bottleneck_dim=32)
    return MultiCropWrapper(backbone, head)


@pytest.fixture(scope="module")
def student() -> MultiCropWrapper:
    return _wrapper(seed=1)


@pytest.fixture(scope="module")
def teacher() -> MultiCropWrapper:
    return _wrapper(seed=2)


def _old_weight_norm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys as torch.nn.utils.weight_norm (DINO) names them."""
    return {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in state.items()
    }


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _backbone_part(wrapper: MultiCropWrapper) -> dict[str, torch.Tensor]:
    return wrapper.backbone.state_dict()


def _assert_state_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def _full_checkpoint(student_state: dict, teacher_state: dict, **extra: object) -> dict:
    return {
        "student": student_state,
        "teacher": teacher_state,
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 3,
        "dino_loss": {"center": torch.zeros(1, OUT_DIM)},
        **extra,
    }


def test_original_dino_vit_checkpoint(tmp_path: Path, student: MultiCropWrapper, teacher: MultiCropWrapper) -> None:
    path = tmp_path / "checkpoint.pth"
    args = argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=OUT_DIM, lr=5e-4, output_dir=".")
    torch.save(
        _full_checkpoint(
            _prefixed(_old_weight_norm_names(student.state_dict()), "module."),
            _old_weight_norm_names(teacher.state_dict()),
            args=args,
        ),
        path,
    )
    assert "head.last_layer.parametrizations.weight.original0" in read_dino_checkpoint(path)

    model, report = load_backbone(path, arch="vit_tiny")
    _assert_state_equal(model.state_dict(), _backbone_part(teacher))
    assert model.img_size == 64 and model.patch_size == 16 and model.in_chans == 3
    assert sorted(report.skipped) == sorted(k for k in teacher.state_dict() if k.startswith("head."))
    assert not report.missing and not report.unexpected and not report.converted

    fresh = _wrapper(seed=3)
    assert load_dino_wrapper_state(fresh, None) is None  # a config's "no pretrained weights"
    report = load_dino_wrapper_state(fresh, path)  # student by default
    assert not report.missing and not report.unexpected
    _assert_state_equal(fresh.state_dict(), student.state_dict())


def test_original_dino_resnet_checkpoint_with_ddp_teacher(tmp_path: Path) -> None:
    source = _wrapper("resnet18", use_bn=True, seed=4)
    state = _prefixed(_old_weight_norm_names(source.state_dict()), "module.")
    path = tmp_path / "rn.pth"
    torch.save(_full_checkpoint(state, state, args=argparse.Namespace(arch="resnet18")), path)
    model, report = load_backbone(path, arch="resnet18")
    _assert_state_equal(model.state_dict(), _backbone_part(source))
    assert report.skipped and all(k.startswith("head.") for k in report.skipped)


def test_dax_checkpoint(tmp_path: Path, student: MultiCropWrapper, teacher: MultiCropWrapper) -> None:
    path = tmp_path / "dax.pth"
    torch.save(
        _full_checkpoint(
            _prefixed(student.state_dict(), "module."), teacher.state_dict(), args=argparse.Namespace(arch="vit_tiny")
        ),
        path,
    )
    model, _ = load_backbone(path, arch="vit_tiny", checkpoint_key="student")
    _assert_state_equal(model.state_dict(), _backbone_part(student))
    fresh = _wrapper(seed=5)
    load_dino_wrapper_state(fresh, path, checkpoint_key="teacher")
    _assert_state_equal(fresh.state_dict(), teacher.state_dict())


def test_our_checkpoint_rebuilds_from_backbone_config(
    tmp_path: Path, student: MultiCropWrapper, teacher: MultiCropWrapper
) -> None:
    path = tmp_path / "ours.pth"
    config = backbone_config(teacher.backbone)
    torch.save(
        _full_checkpoint(student.state_dict(), teacher.state_dict(), backbone_config=config, args={"lr": 5e-4}), path
    )
    model, report = load_backbone(path)
    assert (model.arch, model.patch_size, model.in_chans, model.img_size) == ("vit_tiny", 16, 3, 64)
    _assert_state_equal(model.state_dict(), _backbone_part(teacher))
    assert not report.missing


def test_bare_backbone_state_dict(tmp_path: Path, teacher: MultiCropWrapper) -> None:
    path = tmp_path / "dino_deittiny16_pretrain.pth"
    torch.save(_backbone_part(teacher), path)
    model, _ = load_backbone(path, arch="deit_tiny")  # patch and image size follow from the tensors
    _assert_state_equal(model.state_dict(), _backbone_part(teacher))
    with pytest.raises(ValueError, match="pass arch="):
        load_backbone(path)

    fresh = _wrapper(seed=6)
    head_before = {k: v.clone() for k, v in fresh.head.state_dict().items()}
    report = load_dino_wrapper_state(fresh, path)
    _assert_state_equal(fresh.backbone.state_dict(), _backbone_part(teacher))
    _assert_state_equal(fresh.head.state_dict(), head_before)
    assert sorted(report.missing) == sorted(f"head.{k}" for k in head_before)


def test_dinov2_chunked_blocks(tmp_path: Path, teacher: MultiCropWrapper) -> None:
    chunked = {}
    for key, value in _backbone_part(teacher).items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // 4}.{key.removeprefix('blocks.')}"
        chunked[f"backbone.{key}"] = value
    assert "backbone.blocks.2.11.mlp.fc2.weight" in chunked
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": chunked, "iteration": 10}, path)
    model, _ = load_backbone(path, arch="vit_tiny")
    _assert_state_equal(model.state_dict(), _backbone_part(teacher))


def test_normalize_dino_keys() -> None:
    t = torch.zeros(1)
    renamed = normalize_dino_keys(
        {
            "module.module.backbone.blocks.0.3.attn.qkv.weight": t,
            "module.head.last_layer.weight_g": t,
            "head.last_layer.weight_v": t,
            "backbone.blocks.3.norm1.weight": t,
            "layer1.0.conv1.weight": t,
        }
    )
    assert list(renamed) == [
        "backbone.blocks.3.attn.qkv.weight",
        "head.last_layer.parametrizations.weight.original0",
        "head.last_layer.parametrizations.weight.original1",
        "backbone.blocks.3.norm1.weight",
        "layer1.0.conv1.weight",
    ]
    with pytest.raises(ValueError, match="more than one key"):
        normalize_dino_keys({"module.a": t, "a": t})


@pytest.mark.parametrize("arch", ["vit_tiny", "resnet18"])
def test_three_channel_stem_summed_into_grey_model(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(7)
    source = build_backbone(arch, img_size=64).eval()
    path = tmp_path / "rgb.pth"
    torch.save(source.state_dict(), path)
    grey, report = load_backbone(path, arch=arch, in_chans=1)
    grey.eval()
    assert grey.in_chans == 1
    assert any("summed 3 input channels" in line for line in report.converted)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), source(x.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)


def test_pos_embed_resampled_from_224_to_64(tmp_path: Path) -> None:
    torch.manual_seed(8)
    source = build_backbone("vit_tiny", img_size=224).eval()
    path = tmp_path / "224.pth"
    torch.save(source.state_dict(), path)
    model, report = load_backbone(path, arch="vit_tiny", img_size=64)
    model.eval()
    assert model.pos_embed.shape == (1, 17, 192)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[4, 4], old_size=[14, 14])
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    torch.testing.assert_close(model.pos_embed[:, 0], source.pos_embed[:, 0])
    assert report.converted == ["pos_embed: resampled (1, 197, 192) -> (1, 17, 192)"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))  # the source resamples the same way at run time


def test_plain_last_layer_becomes_weight_norm(tmp_path: Path, teacher: MultiCropWrapper) -> None:
    state = {k: v for k, v in teacher.state_dict().items() if "last_layer" not in k}
    weight = torch.randn(OUT_DIM, 32)
    state["head.last_layer.weight"] = weight
    path = tmp_path / "plain_head.pth"
    torch.save({"student": state, "epoch": 1}, path)
    fresh = _wrapper(seed=9)
    report = load_dino_wrapper_state(fresh, path)
    assert not report.missing and not report.unexpected
    torch.testing.assert_close(fresh.head.last_layer.weight, weight)


def test_errors(tmp_path: Path, teacher: MultiCropWrapper) -> None:
    nothing = tmp_path / "nothing.pth"
    torch.save({"foo.weight": torch.zeros(2)}, nothing)
    with pytest.raises(ValueError, match="no key"):
        load_backbone(nothing, arch="vit_tiny")

    no_teacher = tmp_path / "student_only.pth"
    torch.save({"student": teacher.state_dict(), "epoch": 2}, no_teacher)
    with pytest.raises(ValueError, match=r"no state dict under 'teacher'.*\['epoch', 'student'\]"):
        load_backbone(no_teacher, arch="vit_tiny")

    bare = tmp_path / "bare.pth"
    torch.save(_backbone_part(teacher), bare)
    with pytest.raises(
        ValueError, match=r"shape mismatches.*patch_embed\.proj\.weight \(192, 3, 16, 16\)->\(192, 3, 8, 8\)"
    ):
        load_backbone(bare, arch="vit_tiny", patch_size=8)
    other_head = MultiCropWrapper(teacher.backbone, DINOHead(192, 2 * OUT_DIM, hidden_dim=96, bottleneck_dim=32))
    with pytest.raises(ValueError, match=r"head\.last_layer\.parametrizations\.weight\.original0"):
        load_dino_wrapper_state(other_head, no_teacher)
    with pytest.raises(ValueError, match="unknown backbone arch"):
        load_backbone(bare, arch="vit_giant")
    with pytest.raises(FileNotFoundError):
        load_backbone(tmp_path / "missing.pth", arch="vit_tiny")
