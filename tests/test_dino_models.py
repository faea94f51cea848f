"""2D backbones, DINO head and multi-crop wrapper of the DINO branch."""

from __future__ import annotations

import pytest
import torch
import torchvision

from dae.models.backbone2d import ARCHS, backbone_config, build_backbone, is_vit
from dae.models.dino_head import DINOHead
from dae.models.multicrop import MultiCropWrapper
from dae.models.resnet import ResNet2D
from dae.models.vit import VisionTransformer2D

pytestmark = pytest.mark.usefixtures("one_thread")


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def vit() -> VisionTransformer2D:
    torch.manual_seed(0)
    return build_backbone("vit_tiny", patch_size=16, img_size=64).eval()


@pytest.mark.parametrize("patch_size", [8, 16])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_vit_shapes(patch_size: int, in_chans: int) -> None:
    model = VisionTransformer2D("vit_tiny", patch_size=patch_size, in_chans=in_chans, img_size=32).eval()
    x = torch.randn(2, in_chans, 32, 48)  # non-square, and not the stored 32x32 grid
    h, w = 32 // patch_size, 48 // patch_size
    assert model(x).shape == (2, 192)
    assert model.patch_grid(x).shape == (2, 192, h, w)
    assert model.get_last_selfattention(x).shape == (2, 3, 1 + h * w, 1 + h * w)
    assert [t.shape for t in model.get_intermediate_layers(x, 3)] == [(2, 1 + h * w, 192)] * 3
    assert model.pos_embed.shape == (1, (32 // patch_size) ** 2 + 1, 192)
    assert (model.arch, model.embed_dim, model.patch_size, model.num_heads, model.in_chans) == (
        "vit_tiny",
        192,
        patch_size,
        3,
        in_chans,
    )


def test_vit_rejects_size_not_multiple_of_patch(vit: VisionTransformer2D) -> None:
    for method in (vit, vit.patch_grid, vit.get_last_selfattention, lambda x: vit.get_intermediate_layers(x, 1)):
        with pytest.raises(ValueError, match="30x32 is not a multiple of the patch size 16"):
            method(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"n must be in 1\.\.12"):
        vit.get_intermediate_layers(torch.randn(1, 3, 32, 32), 13)
    with pytest.raises(ValueError, match="unknown ViT arch"):
        VisionTransformer2D("vit_huge")


@pytest.mark.parametrize(
    ("arch", "patch_size", "in_chans", "millions"),
    [
        ("vit_tiny", 16, 3, 5.524),
        ("vit_small", 16, 3, 21.666),
        ("vit_small", 8, 3, 21.670),
        ("vit_small", 16, 1, 21.469),
        ("vit_base", 16, 3, 85.799),
        ("vit_base", 8, 3, 85.808),
    ],
)
def test_vit_param_counts_match_dino(arch: str, patch_size: int, in_chans: int, millions: float) -> None:
    with torch.device("meta"):
        model = VisionTransformer2D(arch, patch_size=patch_size, in_chans=in_chans)
    assert round(_num_params(model) / 1e6, 3) == millions


def test_vit_state_dict_keys_are_dino_layout() -> None:
    with torch.device("meta"):
        model = VisionTransformer2D("vit_small", patch_size=8, drop_path_rate=0.1)
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    expected = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    expected += [f"blocks.{i}.{m}.{p}" for i in range(12) for m in block for p in ("weight", "bias")]
    expected += ["norm.weight", "norm.bias"]
    state = model.state_dict()
    assert list(state) == expected
    assert state["pos_embed"].shape == (1, 785, 384)
    assert state["blocks.0.attn.qkv.weight"].shape == (3 * 384, 384)
    assert model.norm.eps == 1e-6
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_intermediate_layers_and_patch_grid_agree_with_forward(vit: VisionTransformer2D) -> None:
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        cls = vit(x)
        layers = vit.get_intermediate_layers(x, 4)
        (last,) = vit.get_intermediate_layers(x, 1)
        grid = vit.patch_grid(x)
    torch.testing.assert_close(last[:, 0], cls)
    torch.testing.assert_close(layers[-1], last)
    assert not torch.allclose(layers[0], layers[-1])
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), last[:, 1:])


def test_last_selfattention_matches_the_block(vit: VisionTransformer2D) -> None:
    x = torch.randn(2, 3, 32, 64)
    captured = {}
    block = vit.blocks[-1]
    handle = block.register_forward_hook(lambda _m, args, out: captured.update(inp=args[0], out=out))
    try:
        with torch.no_grad():
            vit(x)
            attention = vit.get_last_selfattention(x)
    finally:
        handle.remove()
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 3, 9))
    assert (attention >= 0).all()
    # Rebuild the block's output from these weights: attention @ v -> proj, residual, then the MLP branch.
    inp = captured["inp"]
    batch, tokens, dim = inp.shape
    with torch.no_grad():
        v = block.attn.qkv(block.norm1(inp)).reshape(batch, tokens, 3, 3, dim // 3).permute(2, 0, 3, 1, 4)[2]
        y = inp + block.attn.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, dim))
        y = y + block.mlp(block.norm2(y))
    torch.testing.assert_close(y, captured["out"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_resnet18_shapes_and_keys(in_chans: int) -> None:
    model = build_backbone("resnet18", in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, 64, 96)
    with torch.no_grad():
        pooled = model(x)
        fmap = model.feature_map(x)
    assert pooled.shape == (2, 512)
    assert fmap.shape == (2, 512, 2, 3)
    torch.testing.assert_close(pooled, fmap.mean(dim=(2, 3)))
    assert model.patch_grid(x).shape == fmap.shape
    reference = torchvision.models.resnet18(weights=None).state_dict()
    expected = {k: v.shape for k, v in reference.items() if not k.startswith("fc.")}
    expected["conv1.weight"] = torch.Size([64, in_chans, 7, 7])
    assert {k: v.shape for k, v in model.state_dict().items()} == expected
    assert (model.arch, model.embed_dim, model.in_chans, model.patch_size) == ("resnet18", 512, in_chans, None)
    assert not is_vit(model)
    if in_chans == 3:
        assert round(_num_params(model) / 1e6, 1) == 11.2


def test_resnet50_size() -> None:
    with torch.device("meta"):
        model = ResNet2D("resnet50")
    assert model.embed_dim == 2048
    assert round(_num_params(model) / 1e6, 1) == 23.5


def test_build_backbone_names_and_config() -> None:
    with pytest.raises(ValueError, match="vit_base"):
        build_backbone("vit_large")
    with torch.device("meta"):
        alias = build_backbone("deit_small", patch_size=8)
        assert is_vit(alias) and alias.arch == "vit_small" and alias.patch_size == 8
        for arch in ARCHS:
            model = build_backbone(arch, patch_size=8, in_chans=1, img_size=64)
            config = backbone_config(model)
            assert set(config) == {"arch", "patch_size", "in_chans", "img_size"}
            rebuilt = build_backbone(**config)
            assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
                k: v.shape for k, v in model.state_dict().items()
            }
    assert backbone_config(model) == {"arch": "vit_base", "patch_size": 8, "in_chans": 1, "img_size": 64}
    with pytest.raises(TypeError):
        backbone_config(torch.nn.Linear(2, 2))


def test_dino_head_keys_init_and_frozen_g() -> None:
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (48, 32),
        "mlp.0.bias": (48,),
        "mlp.2.weight": (48, 48),
        "mlp.2.bias": (48,),
        "mlp.4.weight": (16, 48),
        "mlp.4.bias": (16,),
        "last_layer.parametrizations.weight.original0": (64, 1),
        "last_layer.parametrizations.weight.original1": (64, 16),
    }
    g = head.last_layer.parametrizations.weight.original0
    assert torch.equal(g, torch.ones(64, 1)) and not g.requires_grad
    assert head.last_layer.parametrizations.weight.original1.requires_grad
    assert torch.equal(head.mlp[0].bias, torch.zeros(48))
    assert head.mlp[2].weight.std().item() == pytest.approx(0.02, rel=0.15)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(64))
    assert head(torch.randn(5, 32)).shape == (5, 64)

    assert DINOHead(32, 64, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad
    assert [k for k in DINOHead(32, 64, use_bn=True, hidden_dim=8).state_dict() if k.endswith("weight")] == [
        "mlp.0.weight",
        "mlp.1.weight",
        "mlp.3.weight",
        "mlp.4.weight",
        "mlp.6.weight",
    ]
    assert list(DINOHead(32, 64, nlayers=1, bottleneck_dim=16).state_dict())[:2] == ["mlp.weight", "mlp.bias"]
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(32, 64, nlayers=0)


def test_dino_head_normalisation_is_fp16_safe() -> None:
    head = DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4).half()
    assert torch.isfinite(head(torch.zeros(2, 8, dtype=torch.half))).all()


def test_multicrop_groups_by_resolution_in_order(vit: VisionTransformer2D) -> None:
    torch.manual_seed(1)
    wrapper = MultiCropWrapper(vit, DINOHead(192, 64, hidden_dim=96, bottleneck_dim=32)).eval()
    assert [k.split(".")[0] for k in wrapper.state_dict()] == ["backbone"] * 150 + ["head"] * 8
    crops = [torch.randn(2, 3, 64, 64) for _ in range(2)] + [torch.randn(2, 3, 32, 32) for _ in range(3)]
    calls = []
    handle = vit.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            out = wrapper(crops)
    finally:
        handle.remove()
    assert calls == [4, 6]
    assert out.shape == (10, 64)
    with torch.no_grad():
        separate = torch.cat([wrapper.head(vit(crop)) for crop in crops])
        single = wrapper(crops[0])
    torch.testing.assert_close(out, separate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, separate[:2], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        out_again, features = wrapper(crops, return_features=True)
        backbone_features = torch.cat([vit(crop) for crop in crops])
    torch.testing.assert_close(out_again, out)
    torch.testing.assert_close(features, backbone_features, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        wrapper([])
