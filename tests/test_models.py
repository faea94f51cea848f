"""Tests of the DAE network (`dae.models`) and of `dae.utils.state_dict`."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR
from torch import nn

import dae.disruptions
import dae.models.dae
from dae.models import DAEOutput, DisruptiveAutoencoder, ProjectionHead
from dae.utils.state_dict import LoadReport, load_state_dict_with_report, strip_prefix

TINY = {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 3, 4)}
HEAD = {"proj_hidden_dim": 32, "proj_dim": 16}
ENCODER_PREFIXES = tuple(
    f"backbone.{n}." for n in ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10")
)
DECODER_PREFIXES = tuple(f"backbone.{n}." for n in ("decoder1", "decoder2", "decoder3", "decoder4", "decoder5", "out"))


@pytest.fixture(scope="module")
def model() -> DisruptiveAutoencoder:
    torch.manual_seed(0)
    return DisruptiveAutoencoder(**TINY, **HEAD)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 1, 64, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def stock_output(model: DisruptiveAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """Reconstruction of MONAI's own ``SwinUNETR.forward`` on the DAE backbone (no hooks involved)."""
    with torch.no_grad():
        return SwinUNETR.forward(model.backbone, x)


def test_projection_head_layers() -> None:
    single = ProjectionHead(8, out_dim=4, num_layers=1)
    assert [type(m) for m in single.mlp] == [nn.Linear]
    deep = ProjectionHead(8, hidden_dim=6, out_dim=4, num_layers=3)
    assert [type(m) for m in deep.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert deep(torch.randn(5, 8)).shape == (5, 4)
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(8, num_layers=0)


def test_output_shapes_and_unmasked_call_matches_stock_forward(
    model: DisruptiveAutoencoder, x: torch.Tensor, stock_output: torch.Tensor
) -> None:
    with torch.no_grad():
        out = model(x, embedding_mask_ratio=0.0)
    assert isinstance(out, DAEOutput)
    assert out.reconstruction.shape == x.shape
    assert out.projection.shape == (2, 16)
    torch.testing.assert_close(out.reconstruction, stock_output)


def test_backward_reaches_head_and_backbone(model: DisruptiveAutoencoder, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    out = model(x[:1])
    (out.reconstruction.abs().mean() + out.projection.pow(2).mean()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert model.projection.mlp[0].weight.grad.abs().sum() > 0
    assert model.backbone.swinViT.patch_embed.proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_embedding_mask_changes_output_and_removes_hook(
    model: DisruptiveAutoencoder, x: torch.Tensor, stock_output: torch.Tensor
) -> None:
    with torch.no_grad():
        masked = model(x, embedding_mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert len(model.backbone.swinViT.patch_embed._forward_hooks) == 0
    assert not torch.allclose(masked.reconstruction, stock_output)


def test_embedding_mask_zeroes_channels_and_hook_is_removed_on_error(
    model: DisruptiveAutoencoder, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    patch_embed = model.backbone.swinViT.patch_embed
    seen: list[torch.Tensor] = []
    # pos_drop consumes the (masked) patch embeddings.
    probe = model.backbone.swinViT.pos_drop.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(x[:1], embedding_mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    finally:
        probe.remove()
    mask = dae.disruptions.embedding_channel_mask(12, 0.5, torch.Generator().manual_seed(0))
    dropped = mask == 0
    assert int(dropped.sum()) == 6
    assert seen[0][:, dropped].abs().max() == 0
    assert seen[0][:, ~dropped].abs().amax(dim=(0, 2, 3, 4)).gt(0).all()

    def broken(*_args: object, **_kwargs: object) -> torch.Tensor:
        raise RuntimeError("boom")

    monkeypatch.setattr(dae.models.dae, "embedding_channel_mask", broken)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        model(x[:1], embedding_mask_ratio=0.5)
    assert len(patch_embed._forward_hooks) == 0


def test_embedding_mask_reproducible(model: DisruptiveAutoencoder, x: torch.Tensor) -> None:
    with torch.no_grad():
        a = model(x[:1], 0.5, torch.Generator().manual_seed(7))
        b = model(x[:1], 0.5, torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.reconstruction, b.reconstruction, rtol=0, atol=0)
    torch.testing.assert_close(a.projection, b.projection, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("flag", "frozen_prefixes"), [("encoder_off", ENCODER_PREFIXES), ("decoder_off", DECODER_PREFIXES)]
)
def test_freezing(flag: str, frozen_prefixes: tuple[str, ...], x: torch.Tensor) -> None:
    torch.manual_seed(0)
    net = DisruptiveAutoencoder(**TINY, **HEAD, **{flag: True})
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in net.named_parameters() if n.startswith(frozen_prefixes)}
    modules = net.encoder_modules() if flag == "encoder_off" else net.decoder_modules()
    assert frozen == {n for n, p in net.named_parameters() if any(p is q for m in modules for q in m.parameters())}

    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    out = net(x[:1])
    (out.reconstruction.abs().mean() + out.projection.pow(2).mean()).backward()
    optimizer.step()
    for name, param in net.named_parameters():
        assert torch.equal(param, before[name]) == (name in frozen), name


def test_backbone_weights_load_into_stock_swinunetr(model: DisruptiveAutoencoder, x: torch.Tensor) -> None:
    stock = SwinUNETR(in_channels=1, out_channels=14, **TINY)
    source = model.backbone_state_dict()
    assert not any(k.startswith(("out.", "backbone.")) for k in source)
    assert "out.conv.conv.weight" in model.backbone_state_dict(include_output=True)

    report = load_state_dict_with_report(stock, source, name="dae")
    assert sorted(report.missing) == ["out.conv.conv.bias", "out.conv.conv.weight"]
    assert report.unexpected == []
    assert report.mismatched == []
    assert set(report.loaded) == {k for k in stock.state_dict() if not k.startswith("out.")}
    loaded = stock.state_dict()
    for key in report.loaded:
        assert torch.equal(loaded[key], source[key]), key

    with torch.no_grad():
        ours = model.backbone.swinViT(x, True)
        theirs = stock.swinViT(x, True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_nothing_matched_raises_with_name(model: DisruptiveAutoencoder) -> None:
    stock = SwinUNETR(in_channels=1, out_channels=14, **TINY)
    prefixed = {f"module.backbone.{k}": v for k, v in model.backbone_state_dict().items()}
    with pytest.raises(ValueError, match=r"my_ckpt.*module\.backbone\.swinViT"):
        load_state_dict_with_report(stock, prefixed, name="my_ckpt")
    report = load_state_dict_with_report(stock, strip_prefix(prefixed), name="my_ckpt")
    assert report.unexpected == []


def test_strip_prefix() -> None:
    t = torch.zeros(1)
    assert list(strip_prefix({"module.backbone.a": t, "backbone.b": t, "c.module.d": t})) == ["a", "b", "c.module.d"]
    assert list(strip_prefix({"model.a": t}, prefixes=("model.",))) == ["a"]
    with pytest.raises(ValueError, match="'a'"):
        strip_prefix({"module.a": t, "a": t})


def test_shape_mismatch_reported_and_skipped() -> None:
    net = nn.Sequential(nn.Linear(2, 3))
    weight_before = net[0].weight.detach().clone()
    state = {"0.weight": torch.ones(4, 2), "0.bias": torch.full((3,), 5.0), "extra": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"shape mismatches loading ckpt"):
        load_state_dict_with_report(net, state, name="ckpt")

    report = load_state_dict_with_report(net, state, strict_shapes=False, name="ckpt")
    assert report == LoadReport(
        loaded=["0.bias"], missing=[], unexpected=["extra"], mismatched=[("0.weight", (4, 2), (3, 2))], name="ckpt"
    )
    assert torch.equal(net[0].weight, weight_before)
    assert torch.equal(net[0].bias, torch.full((3,), 5.0))
    summary = report.summary()
    assert "loaded 1, missing 0, unexpected 1, shape-mismatched 1" in summary
    assert "0.weight (4, 2)->(3, 2)" in summary


def test_bad_input_raises(model: DisruptiveAutoencoder) -> None:
    with pytest.raises(ValueError, match=r"\[48\].*divisible by 32"):
        model(torch.zeros(1, 1, 48, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        model(torch.zeros(1, 2, 64, 64, 64))
    with pytest.raises(ValueError, match="embedding_mask_ratio"):
        model(torch.zeros(1, 1, 64, 64, 64), embedding_mask_ratio=1.5)
