"""Tests of `dae.models.pretrained`: loading pretraining checkpoints of every format into a stock SwinUNETR."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import filter_swinunetr
from monai.networks.utils import copy_model_state

from dae.models import DisruptiveAutoencoder, PretrainedLoadReport, load_pretrained_swinunetr
from dae.models.pretrained import PARTS

TINY = {"feature_size": 12, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 3, 4)}
F = TINY["feature_size"]
PATCH_EMBED = ["swinViT.patch_embed.proj.weight", "swinViT.patch_embed.proj.bias"]

State = dict[str, torch.Tensor]


def stock(seed: int, out_channels: int = 14, **kwargs: object) -> SwinUNETR:
    torch.manual_seed(seed)
    return SwinUNETR(in_channels=1, out_channels=out_channels, **{**TINY, **kwargs})


def perturbed(state: State) -> State:
    """Add noise to every float tensor, so that no loaded tensor (norms included) equals a fresh init."""
    gen = torch.Generator().manual_seed(123)
    return {k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in state.items()}


def snapshot(model: torch.nn.Module) -> State:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state(model: SwinUNETR, init: State, source: State, loaded: set[str]) -> None:
    """Keys in ``loaded`` equal ``source`` (and differ from ``init`` where floating); all others equal ``init``."""
    for key, value in model.state_dict().items():
        if key in loaded:
            assert torch.equal(value, source[key]), key
            assert not value.is_floating_point() or not torch.equal(value, init[key]), key
        else:
            assert torch.equal(value, init[key]), key


def part_keys(model: SwinUNETR, parts: str) -> set[str]:
    return {k for k in model.state_dict() if k.startswith(PARTS[parts])}


@pytest.fixture(scope="module")
def fresh() -> tuple[SwinUNETR, State]:
    model = stock(0)
    return model, snapshot(model)


@pytest.fixture
def target(fresh: tuple[SwinUNETR, State]) -> tuple[SwinUNETR, State]:
    """The fine-tuning network, reset to its initial weights (built once: construction is the slow part)."""
    model, init = fresh
    model.load_state_dict(init)
    return model, init


@pytest.fixture(scope="module")
def ssl_encoder() -> State:
    return perturbed(stock(3).swinViT.state_dict())


@pytest.fixture(scope="module")
def dae_source() -> State:
    torch.manual_seed(1)
    return perturbed(DisruptiveAutoencoder(**TINY, proj_hidden_dim=32, proj_dim=16).state_dict())


@pytest.fixture(scope="module")
def official_source() -> State:
    """A stock-named state dict (pretraining output layer with 1 channel) to rename into the official layout."""
    return perturbed(stock(2, out_channels=1).state_dict())


def to_official(state: State, mlp: str = "fc") -> State:
    """Rename stock keys into the ``encoder.layersN.0.0`` layout, keeping MONAI's linear patch embedding.

    ``mlp="fc"`` names the Swin MLP layers like the official DAE code, ``"linear"`` like MONAI.
    """
    out = {}
    for key, value in state.items():
        if key.startswith("swinViT.patch_embed."):
            out["encoder." + key.removeprefix("swinViT.")] = value
        elif key.startswith("swinViT.layers"):
            layer, rest = key.removeprefix("swinViT.").split(".0.", 1)
            out[f"encoder.{layer}.0.0.{rest.replace('mlp.linear', f'mlp.{mlp}')}"] = value
        else:
            out[key] = value
    return out


OFFICIAL_ONLY = {
    "encoder.patch_embed.proj.conv1.conv.weight": (F, 1, 3, 3, 3),
    "encoder.patch_embed.proj.conv2.conv.weight": (F, F, 3, 3, 3),
    "encoder.patch_embed.proj.norm1.weight": (F,),
    "encoder.patch_embed.proj.norm1.bias": (F,),
    "encoder.patch_embed.proj.norm2.weight": (F,),
    "encoder.patch_embed.proj.norm2.bias": (F,),
    "encoder.mask_token": (1, 1, F),
    "encoder.norm.weight": (16 * F,),
    "encoder.norm.bias": (16 * F,),
    "encoder2.layer.conv3.conv.weight": (F, F, 1, 1, 1),
    "encoder10.layer.conv3.conv.weight": (16 * F, 16 * F, 1, 1, 1),
}


@pytest.mark.parametrize("parts", ["encoder", "both", "decoder"])
def test_dae_format(tmp_path: Path, target: tuple[SwinUNETR, State], dae_source: State, parts: str) -> None:
    path = tmp_path / "ckpt_best.pth"
    torch.save({"model": dae_source, "optimizer": {}, "epoch": 1}, path)
    model, init = target
    report = load_pretrained_swinunetr(model, path, parts=parts)

    expected = part_keys(model, parts)
    assert isinstance(report, PretrainedLoadReport)
    assert report.fmt == "dae" and report.parts == parts
    assert set(report.loaded) == expected
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    source = {k.removeprefix("backbone."): v for k, v in dae_source.items()}
    assert_state(model, init, source, expected)

    reasons = dict(report.skipped)
    assert {k for k in reasons if k.startswith("projection.")} == {k for k in dae_source if k.startswith("projection.")}
    assert all("output layer" in reasons[k] for k in ("out.conv.conv.weight", "out.conv.conv.bias"))
    not_requested = {k for k, r in report.skipped if "not requested" in r}
    assert not_requested == part_keys(model, "both") - expected
    assert "skipped" in report.summary()


@pytest.mark.parametrize("prefix", ["module.swinViT.", "swin_vit.", "module.swin_vit.", "swinViT.", ""])
def test_monai_ssl_format(tmp_path: Path, target: tuple[SwinUNETR, State], ssl_encoder: State, prefix: str) -> None:
    encoder = ssl_encoder
    heads = {
        "rotation_head.weight": torch.randn(4, 16 * F),
        "rotation_head.bias": torch.randn(4),
        "contrastive_head.weight": torch.randn(32, 16 * F),
        "contrastive_head.bias": torch.randn(32),
        "conv.0.weight": torch.randn(8 * F, 16 * F, 3, 3, 3),
    }
    head_prefix = "module." if prefix.startswith("module.") else ""
    state = {prefix + k: v for k, v in encoder.items()} | {head_prefix + k: v for k, v in heads.items()}
    path = tmp_path / "model_swinvit.pt"
    torch.save({"global_step": 10, "state_dict": state}, path)
    model, init = target
    report = load_pretrained_swinunetr(model, path)

    expected = {"swinViT." + k for k in encoder}
    assert report.fmt == "monai_ssl"
    assert set(report.loaded) == expected
    assert set(report.missing) == part_keys(model, "encoder") - expected
    assert report.unexpected == []
    assert {k for k, _ in report.skipped} == set(heads)
    assert_state(model, init, {"swinViT." + k: v for k, v in encoder.items()}, expected)

    with pytest.raises(ValueError, match="nothing to load"):
        load_pretrained_swinunetr(model, path, parts="decoder")


def test_official_dae_format(tmp_path: Path, target: tuple[SwinUNETR, State], official_source: State) -> None:
    official = {k: v for k, v in to_official(official_source).items() if not k.startswith("encoder.patch_embed.")}
    gen = torch.Generator().manual_seed(4)
    official |= {k: torch.randn(shape, generator=gen) for k, shape in OFFICIAL_ONLY.items()}
    path = tmp_path / "ckpt_best.pth"
    torch.save({"model": official, "epoch": 100}, path)
    model, init = target
    report = load_pretrained_swinunetr(model, path, parts="both")

    expected = part_keys(model, "both") - set(PATCH_EMBED)
    assert report.fmt == "official_dae"
    assert set(report.loaded) == expected
    assert report.missing == PATCH_EMBED
    assert report.unexpected == []
    assert_state(model, init, official_source, expected)
    assert torch.equal(
        model.swinViT.layers3[0].blocks[1].mlp.linear2.weight, official["encoder.layers3.0.0.blocks.1.mlp.fc2.weight"]
    )

    reasons = dict(report.skipped)
    assert set(reasons) == set(OFFICIAL_ONLY) | {"out.conv.conv.weight", "out.conv.conv.bias"}
    assert all("patch embedding" in reasons[k] for k in OFFICIAL_ONLY if k.startswith("encoder.patch_embed."))
    assert "mask token" in reasons["encoder.mask_token"]
    assert "LayerNorm" in reasons["encoder.norm.weight"]
    assert all("conv3" in reasons[k] for k in ("encoder2.layer.conv3.conv.weight", "encoder10.layer.conv3.conv.weight"))
    summary = report.summary().split("\n")
    assert summary[0].endswith("missing 2, unexpected 0, shape-mismatched 0, skipped 13")
    assert any(line.startswith("  missing: swinViT.patch_embed.proj.weight") for line in summary)
    assert any("SimMIM mask token" in line and "encoder.mask_token" in line for line in summary)


def test_monai_ssl_50k_layout_matches_filter_swinunetr(
    tmp_path: Path, target: tuple[SwinUNETR, State], official_source: State
) -> None:
    """The ``ssl_pretrained_weights.pth`` layout (linear patch embed) loads like MONAI's ``filter_swinunetr``."""
    state = to_official(official_source, mlp="linear")
    state["encoder.mask_token"] = torch.zeros(1, 1, F)
    path = tmp_path / "ssl_pretrained_weights.pth"
    torch.save({"model": state}, path)
    model, init = target
    report = load_pretrained_swinunetr(model, path)

    assert report.fmt == "official_dae"
    assert report.missing == []
    assert set(report.loaded) == part_keys(model, "encoder")
    assert_state(model, init, official_source, part_keys(model, "encoder"))

    ours = snapshot(model)
    model.load_state_dict(init)
    copy_model_state(model, state, filter_func=filter_swinunetr)
    for key, value in model.state_dict().items():
        if key.startswith("swinViT."):
            assert torch.equal(ours[key], value), key


def test_plain_swinunetr_state_dict(tmp_path: Path, target: tuple[SwinUNETR, State], official_source: State) -> None:
    source = official_source
    path = tmp_path / "swinunetr.pt"
    torch.save(source, path)
    model, init = target
    report = load_pretrained_swinunetr(model, path, parts="both", name="plain")

    assert report.fmt == "swinunetr" and report.name == "plain"
    assert set(report.loaded) == part_keys(model, "both")
    assert_state(model, init, source, part_keys(model, "both"))


def test_bad_arguments(tmp_path: Path, target: tuple[SwinUNETR, State]) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, path)
    model, _ = target
    with pytest.raises(ValueError, match="unknown fmt 'timm'"):
        load_pretrained_swinunetr(model, path, fmt="timm")
    with pytest.raises(ValueError, match="unknown parts 'out'"):
        load_pretrained_swinunetr(model, path, parts="out")
    with pytest.raises(FileNotFoundError):
        load_pretrained_swinunetr(model, tmp_path / "absent.pt")


def test_undetectable_or_unmatched_checkpoint(tmp_path: Path, target: tuple[SwinUNETR, State]) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, path)
    model, init = target
    with pytest.raises(ValueError, match=r"cannot tell the format.*official_dae.*foo\.weight"):
        load_pretrained_swinunetr(model, path)
    with pytest.raises(ValueError, match=rf"no key of {re.escape(str(path))} matches"):
        load_pretrained_swinunetr(model, path, fmt="dae")
    assert_state(model, init, {}, set())

    torch.save({"epoch": 3, "weights": {"foo.weight": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="not a state dict"):
        load_pretrained_swinunetr(model, path, fmt="swinunetr")


def test_shape_mismatch_raises(tmp_path: Path, target: tuple[SwinUNETR, State]) -> None:
    path = tmp_path / "wide.pt"
    torch.save({"state_dict": stock(6, feature_size=24).state_dict()}, path)
    model, init = target
    with pytest.raises(ValueError, match=r"(?s)shape mismatches.*swinViT\.patch_embed\.proj\.weight"):
        load_pretrained_swinunetr(model, path)
    assert_state(model, init, {}, set())
