"""2D Vision Transformers laid out like DINO's, so published DINO / DAX ViT weights load by name.

:class:`VisionTransformer2D` is timm's ``VisionTransformer`` configured with DINO's choices (pre-norm blocks,
fused ``qkv`` with bias, ``LayerNorm(eps=1e-6)``, MLP ratio 4, depth 12, class-token pooling, no layer scale and
no classifier), so its state-dict keys are exactly those of ``facebookresearch/dino``'s ``vision_transformer.py``::

    cls_token                       [1, 1, D]
    pos_embed                       [1, (img_size // p) ** 2 + 1, D]
    patch_embed.proj.weight / bias  [D, in_chans, p, p] / [D]
    blocks.{i}.norm1, blocks.{i}.attn.qkv, blocks.{i}.attn.proj, blocks.{i}.norm2,
    blocks.{i}.mlp.fc1, blocks.{i}.mlp.fc2                  (i = 0 .. 11)
    norm.weight / bias

Inputs of any height and width that are multiples of the patch size are accepted: the stored positional
embeddings are resampled to the input's patch grid (bicubic with antialiasing, as in DAX's fix of DINO's
interpolation, and with an explicit target size so non-square inputs work).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["VIT_CONFIGS", "VisionTransformer2D"]

VIT_CONFIGS: dict[str, dict[str, int]] = {
    "vit_tiny": {"embed_dim": 192, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "num_heads": 12},
}


class VisionTransformer2D(VisionTransformer):
    """DINO-layout ViT returning the normalised class token.

    Args:
        arch: one of ``"vit_tiny"`` (D=192, 3 heads), ``"vit_small"`` (384, 6) or ``"vit_base"`` (768, 12).
        patch_size: side of the square patches (DINO releases 8 and 16).
        in_chans: number of input channels (1 for a grey stem, 3 for the published weights).
        img_size: the square input size the stored ``pos_embed`` is made for (``(img_size // patch_size) ** 2 + 1``
            tokens); other sizes are handled by resampling.
        drop_path_rate: stochastic-depth rate of the last block, growing linearly from 0 in the first.

    Attributes:
        arch: the ``arch`` argument.
        embed_dim: token width D.
        patch_size: the patch side, an int.
        num_heads: attention heads per block.
        in_chans: input channels.
        img_size: the ``img_size`` argument.

    Raises:
        ValueError: for an unknown ``arch`` or a non-positive size.
    """

    def __init__(
        self,
        arch: str = "vit_small",
        patch_size: int = 16,
        in_chans: int = 3,
        img_size: int = 224,
        drop_path_rate: float = 0.0,
    ) -> None:
        if arch not in VIT_CONFIGS:
            raise ValueError(f"unknown ViT arch {arch!r}; expected one of {tuple(VIT_CONFIGS)}")
        if patch_size < 1 or in_chans < 1 or img_size < patch_size:
            raise ValueError(
                f"need patch_size >= 1, in_chans >= 1 and img_size >= patch_size, got patch_size={patch_size}, "
                f"in_chans={in_chans}, img_size={img_size}"
            )
        config = VIT_CONFIGS[arch]
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="token",
            embed_dim=config["embed_dim"],
            depth=12,
            num_heads=config["num_heads"],
            mlp_ratio=4.0,
            qkv_bias=True,
            init_values=None,
            class_token=True,
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        # timm starts the class token at N(0, 1e-6); DINO uses the same truncated normal as pos_embed.
        trunc_normal_(self.cls_token, std=0.02)
        self.arch = arch
        self.patch_size = patch_size
        self.num_heads = config["num_heads"]
        self.img_size = img_size

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"{self.arch} expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of the patch size {self.patch_size} "
                f"({self.arch}/{self.patch_size}); resize, crop or pad the input"
            )

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Class token and patch tokens with positional embeddings, before the first block: [B, 1+N, D]."""
        self._check_input(x)
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        """All tokens after the final norm, ``[B, 1+N, D]`` (timm's method, with the input-size check).

        Raises:
            ValueError: when H or W is not a multiple of the patch size.
        """
        self._check_input(x)
        return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class token after the final norm.

        Args:
            x: images, shape (B, in_chans, H, W), H and W multiples of ``patch_size``.

        Returns:
            Features, shape (B, embed_dim).

        Raises:
            ValueError: when H or W is not a multiple of the patch size.
        """
        return self.forward_head(self.forward_features(x))

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Outputs of the last ``n`` blocks, each passed through the final norm (DINO's linear-probe input).

        Args:
            x: images, shape (B, in_chans, H, W).
            n: how many of the last blocks to return, 1 to the depth.

        Returns:
            ``n`` tensors of shape (B, 1+N, D) (class token first), the oldest block first.

        Raises:
            ValueError: for ``n`` out of range or an input size that is not a multiple of the patch size.
        """
        depth = len(self.blocks)
        if not 1 <= n <= depth:
            raise ValueError(f"n must be in 1..{depth}, got {n}")
        x = self._tokens(x)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index >= depth - n:
                outputs.append(self.norm(x))
        return outputs

    def patch_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens of the last block after the final norm, as a feature map.

        Args:
            x: images, shape (B, in_chans, H, W).

        Returns:
            Features, shape (B, D, H / patch_size, W / patch_size).
        """
        tokens = self.forward_features(x)[:, self.num_prefix_tokens :]
        height, width = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return tokens.reshape(x.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights of the last block (for DINO's attention maps).

        The weights are computed explicitly from the last block's ``norm1`` and ``attn.qkv`` (the block itself
        uses a fused kernel that does not expose them); dropout on attention is not applied.

        Args:
            x: images, shape (B, in_chans, H, W).

        Returns:
            Attention, shape (B, num_heads, 1+N, 1+N); each row sums to 1.
        """
        x = self._tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        attn = self.blocks[-1].attn
        batch, tokens, _ = x.shape
        qkv = attn.qkv(self.blocks[-1].norm1(x))
        q, k, _ = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
