"""Tests of the feature extractors (`dae.evaluation.features`), the backbone factory (`dae.models.factory`) and the
HF DINOv2 loader (`dae.models.hf_dinov2`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dae.evaluation.features import (
    AdaptedExtractor,
    DAE3DExtractor,
    DinoBackboneExtractor,
    HFDinov2Extractor,
    build_extractor,
    extract_features,
)
from dae.evaluation.featureset import FeatureSet
from dae.evaluation.finetune import ProbeFeatures
from dae.models.backbone2d import build_backbone
from dae.models.dae import DisruptiveAutoencoder
from dae.models.hf_dinov2 import RAD_DINO_MEAN, RAD_DINO_STD, RadDinoPreprocess, load_hf_dinov2
from dae.utils.pictures import pca_rgb

transformers = pytest.importorskip("transformers")  # the optional "hf" extra

TINY_HF = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 14,
    "image_size": 56,
    "mlp_ratio": 2,
}
TINY_DAE = {
    "feature_size": 12,
    "depths": (1, 1, 1, 1),
    "num_heads": (1, 2, 3, 4),
    "proj_hidden_dim": 32,
    "proj_dim": 16,
}
PREPROCESSOR = {
    "do_resize": True,
    "size": {"shortest_edge": 56},
    "do_center_crop": True,
    "crop_size": {"height": 56, "width": 56},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [RAD_DINO_MEAN] * 3,
    "image_std": [RAD_DINO_STD] * 3,
    "resample": 3,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY_HF)).eval()
    folder = tmp_path_factory.mktemp("rad_dino_tiny")
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return folder, model


@pytest.fixture(scope="module")
def vit16() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("vit_tiny", patch_size=16).eval()


@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("resnet18", in_chans=1).eval()


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_load_hf_dinov2_offline_matches_original(hf_folder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, model = hf_folder
    loaded = load_hf_dinov2(folder)
    assert isinstance(loaded, transformers.Dinov2Model)
    assert not loaded.training
    x = _x(2, 3, 56, 84)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).last_hidden_state, model(x).last_hidden_state, rtol=0, atol=0)


def test_load_hf_dinov2_errors_name_the_folder(hf_folder, tmp_path: Path) -> None:
    folder, _ = hf_folder
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_dinov2(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*config.json"):
        load_hf_dinov2(tmp_path)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*no weights"):
        load_hf_dinov2(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="not a DINOv2 model"):
        load_hf_dinov2(tmp_path)


def test_hf_extractor_cls_blocks_and_grid(hf_folder) -> None:
    folder, model = hf_folder
    extractor = HFDinov2Extractor(load_hf_dinov2(folder), n_last_blocks=2)
    x = _x(2, 3, 56, 84)
    with torch.no_grad():
        out = extractor(x)
        ref = model(x, output_hidden_states=True)
    assert (extractor.embed_dim, extractor.patch_size, extractor.n_blocks) == (32, 14, 2)
    torch.testing.assert_close(out["cls"], ref.pooler_output)
    torch.testing.assert_close(out["cls_blocks"][:, -1], out["cls"])
    torch.testing.assert_close(out["cls_blocks"][:, 0], model.layernorm(ref.hidden_states[-2])[:, 0])
    assert out["patch_grid"].shape == (2, 32, 4, 6)
    torch.testing.assert_close(out["patch_grid"][:, :, 2, 5], ref.last_hidden_state[:, 1 + 2 * 6 + 5])
    with pytest.raises(ValueError, match="n_last_blocks"):
        HFDinov2Extractor(model, n_last_blocks=3)


def test_hf_extractor_skips_register_tokens() -> None:
    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(**TINY_HF, num_register_tokens=2)
    model = transformers.Dinov2WithRegistersModel(config).eval()
    x = _x(1, 3, 42, 28)
    with torch.no_grad():
        out = HFDinov2Extractor(model, n_last_blocks=1)(x)
        tokens = model(x).last_hidden_state
    assert out["patch_grid"].shape == (1, 32, 3, 2)
    torch.testing.assert_close(out["patch_grid"].flatten(2).transpose(1, 2), tokens[:, 3:])


def test_rad_dino_preprocess_values_and_shapes(hf_folder, tmp_path: Path) -> None:
    transform = RadDinoPreprocess()
    grey8 = torch.full((1, 300, 400), 128, dtype=torch.uint8)
    out = transform(grey8)
    assert out.shape == (3, 518, 518) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full_like(out, (128 / 255 - RAD_DINO_MEAN) / RAD_DINO_STD))
    unit = transform(torch.full((1, 600, 520), 0.25))
    torch.testing.assert_close(unit, torch.full_like(unit, (0.25 - RAD_DINO_MEAN) / RAD_DINO_STD))
    as_float_8bit = transform(torch.full((3, 520, 600), 200.0))
    torch.testing.assert_close(as_float_8bit[0, 0, 0], torch.tensor((200 / 255 - RAD_DINO_MEAN) / RAD_DINO_STD))

    small = RadDinoPreprocess.from_preprocessor_config(hf_folder[0])
    assert (small.size, small.crop, small.interpolation) == (56, (56, 56), "bicubic")
    # shorter side 100 -> 56 (long side 200 -> 112), then the central 56 columns: cols 28..83 of the resized image
    ramp = torch.linspace(0, 1, 200).expand(1, 100, 200).clone()
    out = small(ramp)
    assert out.shape == (3, 56, 56)
    assert out[0, 0, 0] * RAD_DINO_STD + RAD_DINO_MEAN == pytest.approx(28.5 / 112, abs=0.02)
    assert small(torch.rand(2, 1, 70, 60)).shape == (2, 3, 56, 56)
    assert RadDinoPreprocess.from_preprocessor_config(tmp_path).size == 518

    with pytest.raises(ValueError, match="8-bit"):
        transform(torch.full((1, 10, 10), 4000.0))
    with pytest.raises(ValueError, match=r"\[1 or 3, H, W\]"):
        transform(torch.zeros(2, 10, 10))


def test_rad_dino_preprocess_matches_transformers_processor() -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 256, (1, 1, 30, 40), generator=generator).float()
    image = torch.nn.functional.interpolate(coarse, size=(300, 400), mode="bilinear").round().to(torch.uint8)[0]
    processor = transformers.BitImageProcessor(
        size={"shortest_edge": 518},
        crop_size={"height": 518, "width": 518},
        image_mean=[RAD_DINO_MEAN] * 3,
        image_std=[RAD_DINO_STD] * 3,
        resample=3,
    )
    reference = processor(Image.fromarray(image[0].numpy()), return_tensors="pt")["pixel_values"][0]
    ours = RadDinoPreprocess()(image)
    # PIL resamples in 8 bit, so the two agree to about one grey level
    assert (ours - reference).abs().max() < 1.5 / 255 / RAD_DINO_STD


@pytest.mark.parametrize("patch_size", [8, 16])
def test_vit_extractor_matches_backbone(patch_size: int) -> None:
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=patch_size, img_size=32).eval()
    extractor = DinoBackboneExtractor(backbone, n_last_blocks=3)
    x = _x(2, 3, 32, 48)
    with torch.no_grad():
        out = extractor(x)
        blocks = backbone.get_intermediate_layers(x, 3)
        torch.testing.assert_close(out["cls"], backbone(x))
        torch.testing.assert_close(out["patch_grid"], backbone.patch_grid(x))
    assert out["patch_grid"].shape == (2, 192, 32 // patch_size, 48 // patch_size)
    assert out["cls_blocks"].shape == (2, 3, 192)
    for i in range(3):
        torch.testing.assert_close(out["cls_blocks"][:, i], blocks[i][:, 0])


def test_resnet_extractor_shapes(resnet18) -> None:
    extractor = DinoBackboneExtractor(resnet18, n_last_blocks=4)
    x = _x(2, 1, 64, 96)
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["cls"], resnet18(x))
    assert out["patch_grid"].shape == (2, 512, 2, 3)
    assert out["cls_blocks"].shape == (2, 1, 512)
    assert (extractor.n_blocks, extractor.patch_size, extractor.has_patch_tokens) == (1, 32, False)
    with pytest.raises(ValueError, match="avgpool"):
        ProbeFeatures(extractor, n_blocks=1, avgpool=True)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        extractor(_x(2, 3, 64, 64))


def test_dae3d_extractor_shapes_and_projection_input() -> None:
    torch.manual_seed(0)
    model = DisruptiveAutoencoder(**TINY_DAE).eval()
    x = _x(1, 1, 64, 64, 64)
    extractor = DAE3DExtractor(model)
    with torch.no_grad():
        out = extractor(x)
        # the deepest stage is what the DAE projection head pools
        bottleneck = model.backbone.swinViT(x, model.backbone.normalize)[4]
    torch.testing.assert_close(out["patch_grid"], bottleneck)
    torch.testing.assert_close(out["cls"], bottleneck.mean(dim=(2, 3, 4)))
    assert out["patch_grid"].shape == (1, 192, 2, 2, 2)
    assert out["cls"].shape == (1, 192) and out["cls_blocks"].shape == (1, 1, 192)
    assert (extractor.embed_dim, extractor.patch_size, extractor.spatial_dims) == (192, 32, 3)
    shallow = DAE3DExtractor(model.backbone, stage=2)
    with torch.no_grad():
        assert shallow(x)["patch_grid"].shape == (1, 48, 8, 8, 8)
    assert shallow.patch_size == 8
    with pytest.raises(ValueError, match="divisible by 32"):
        extractor(_x(1, 1, 48, 64, 64))
    with pytest.raises(TypeError):
        DAE3DExtractor(torch.nn.Linear(2, 2))


def test_build_extractor_kinds_and_errors(hf_folder, vit16, tmp_path: Path) -> None:
    random_vit = build_extractor({"kind": "dino", "arch": "vit_tiny", "patch_size": 8, "checkpoint": None})
    assert isinstance(random_vit.extractor, DinoBackboneExtractor)
    assert random_vit.patch_size == 8 and random_vit.n_blocks == 4

    torch.save(vit16.state_dict(), tmp_path / "vit.pth")
    loaded = build_extractor({"kind": "dino", "arch": "vit_tiny", "checkpoint": str(tmp_path / "vit.pth")})
    x = _x(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["cls"], vit16(x))

    hf = build_extractor({"kind": "hf_dinov2", "path": str(hf_folder[0]), "n_last_blocks": 1})
    assert isinstance(hf.extractor, HFDinov2Extractor) and hf.n_blocks == 1

    torch.manual_seed(0)
    dae = DisruptiveAutoencoder(**TINY_DAE).eval()
    torch.save({"model": dae.state_dict()}, tmp_path / "dae.pt")
    spec = {"kind": "dae3d", "checkpoint": str(tmp_path / "dae.pt"), "feature_size": 12, "depths": [1, 1, 1, 1]}
    spec["num_heads"] = [1, 2, 3, 4]
    volume = _x(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(build_extractor(spec)(volume)["cls"], DAE3DExtractor(dae)(volume)["cls"])

    with pytest.raises(ValueError, match="unknown backbone kind"):
        build_extractor({"kind": "clip"})
    with pytest.raises(ValueError, match=r"lacks \['checkpoint'\]"):
        build_extractor({"kind": "dino", "arch": "vit_tiny"})
    with pytest.raises(ValueError, match="unknown keys"):
        build_extractor({"kind": "hf_dinov2", "path": "x", "patch": 14})
    with pytest.raises(ValueError, match="needs 'arch'"):
        build_extractor({"kind": "dino", "checkpoint": None})


def test_adapted_extractor_fits_grey_images_to_the_backbone(vit16) -> None:
    extractor = DinoBackboneExtractor(vit16, n_last_blocks=2)
    grey = torch.rand(2, 1, 24, 40, generator=torch.Generator().manual_seed(0))
    adapted = AdaptedExtractor(extractor, input_size=32, mean=0.5, std=0.25)
    assert (adapted.in_chans, adapted.embed_dim, adapted.patch_size, adapted.n_blocks) == (3, 192, 16, 2)
    expected = torch.nn.functional.interpolate(grey, size=(32, 32), mode="bicubic", antialias=True)
    torch.testing.assert_close(adapted.adapt(grey), ((expected - 0.5) / 0.25).expand(-1, 3, -1, -1))
    with torch.no_grad():
        torch.testing.assert_close(adapted(grey)["cls"], extractor(adapted.adapt(grey))["cls"])
    plain = AdaptedExtractor(extractor)
    rgb = _x(1, 3, 32, 32)
    assert torch.equal(plain.adapt(rgb), rgb)
    with pytest.raises(ValueError, match="mean and std"):
        AdaptedExtractor(extractor, mean=0.5)
    spec = {"kind": "dino", "arch": "vit_tiny", "checkpoint": None, "input_size": 32, "mean": 0.5, "std": 0.25}
    assert build_extractor(spec).input_size == 32
    with pytest.raises(ValueError, match=r"unknown keys.*allowed"):
        build_extractor({**spec, "stage": 2})


def test_extract_features_in_order_and_probe_features(vit16, resnet18) -> None:
    extractor = DinoBackboneExtractor(vit16, n_last_blocks=4)
    images = _x(5, 3, 32, 32)
    samples = [{"image": images[i], "label": i % 2, "name": f"case{i}"} for i in range(5)]
    features = extract_features(extractor, DataLoader(samples, batch_size=2), id_key="name", class_names=["a", "b"])
    assert isinstance(features, FeatureSet)
    assert features.ids == [f"case{i}" for i in range(5)]
    assert features.labels.tolist() == [0, 1, 0, 1, 0]
    assert features.class_names == ["a", "b"]
    assert features.cls_blocks.shape == (5, 4, 192) and features.patch_mean.shape == (5, 192)
    with torch.no_grad():
        one = extractor(images[3:4])
        probe = ProbeFeatures(extractor, n_blocks=2, avgpool=True)(images)
    torch.testing.assert_close(features.cls_blocks[3], one["cls_blocks"][0])
    torch.testing.assert_close(features.patch_mean[3], one["patch_grid"][0].mean(dim=(1, 2)))
    assert probe.shape == (5, 192 * 3)
    torch.testing.assert_close(probe, features.linear_input(2, True))

    tuples = DataLoader(list(zip(images[:, :1], torch.tensor([2, 0, 1, 1, 0]))), batch_size=3)
    plain = extract_features(DinoBackboneExtractor(resnet18), tuples)
    assert plain.ids == ["0", "1", "2", "3", "4"] and plain.class_names == ["0", "1", "2"]
    assert plain.patch_mean is None and plain.cls_blocks.shape == (5, 1, 512)
    with pytest.raises(ValueError, match="no sample"):
        extract_features(extractor, [])


def test_pca_rgb_range_and_structure() -> None:
    grid = 0.01 * _x(16, 6, 8)
    grid[:, :, :4] += _x(16, 1, 1, seed=1)  # left half differs from the right along one direction
    rgb = pca_rgb(grid)
    assert rgb.shape == (3, 6, 8)
    assert float(rgb.min()) == 0.0 and float(rgb.max()) == 1.0
    first = rgb[0]
    assert (first[:, :4].mean() - first[:, 4:].mean()).abs() > 0.9
    batch = pca_rgb(torch.stack([grid, grid]))
    assert batch.shape == (2, 3, 6, 8)
    torch.testing.assert_close(batch[0], batch[1])
    assert pca_rgb(torch.ones(4, 3, 3)).eq(0).all()
    assert pca_rgb(_x(2, 3, 3))[2].eq(0).all()
