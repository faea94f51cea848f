"""The Disruptive Autoencoder (DAE) pretraining network, built around MONAI's stock ``SwinUNETR``.

The network reconstructs the clean volume from a disrupted one (the disruptions are applied to the
input by the data pipeline) and projects the pooled bottleneck for the cross-modal contrastive loss.
Because the backbone is an unmodified ``monai.networks.nets.SwinUNETR``, its weights load by name
into a stock ``SwinUNETR`` for fine-tuning (see :meth:`DisruptiveAutoencoder.backbone_state_dict`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from monai.networks.nets import SwinUNETR
from torch import nn

from dae.disruptions import embedding_channel_mask
from dae.models.heads import ProjectionHead

__all__ = ["DAEOutput", "DisruptiveAutoencoder"]

_ENCODER_NAMES = ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10")
_DECODER_NAMES = ("decoder1", "decoder2", "decoder3", "decoder4", "decoder5", "out")


class DAEOutput(NamedTuple):
    """Outputs of :class:`DisruptiveAutoencoder`.

    Attributes:
        reconstruction: reconstructed volume, shape (B, C, D, H, W), same shape as the input.
        projection: projected pooled bottleneck features, shape (B, proj_dim).
    """

    reconstruction: torch.Tensor
    projection: torch.Tensor


class DisruptiveAutoencoder(nn.Module):
    """SwinUNETR autoencoder with a projection head on the global-average-pooled bottleneck.

    ``encoder_off`` freezes the encoder path (``swinViT``, ``encoder1``-``encoder4``, ``encoder10``) and
    ``decoder_off`` the decoder path (``decoder1``-``decoder5``, ``out``). The reference implementation
    froze neither ``encoder1`` nor ``out``; here each flag freezes its whole path, because ``encoder1``
    (the full-resolution conv skip) is transferred with the encoder weights and ``out`` is the last decoder
    layer, so leaving either trainable makes a "frozen" run silently adapt that path anyway. The projection
    head is never frozen.

    Args:
        in_channels: number of input channels; the reconstruction has the same number of channels.
        feature_size: SwinUNETR feature size (embedding width), divisible by 12.
        depths: number of Swin blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window size.
        use_v2: use SwinUNETR-v2 (residual conv block before each Swin stage).
        use_checkpoint: gradient checkpointing in the Swin stages.
        drop_path_rate: stochastic-depth rate of the Swin stages.
        normalize: layer-normalise the hidden states passed to the decoder (SwinUNETR ``normalize``).
        proj_hidden_dim: hidden width of the projection head.
        proj_dim: output size of the projection head.
        encoder_off: freeze the encoder path.
        decoder_off: freeze the decoder path.
    """

    def __init__(
        self,
        in_channels: int = 1,
        feature_size: int = 48,
        depths: tuple[int, ...] = (2, 2, 2, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        use_v2: bool = False,
        use_checkpoint: bool = False,
        drop_path_rate: float = 0.0,
        normalize: bool = True,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        encoder_off: bool = False,
        decoder_off: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.backbone = SwinUNETR(
            in_channels=in_channels,
            out_channels=in_channels,
            spatial_dims=3,
            feature_size=feature_size,
            depths=depths,
            num_heads=num_heads,
            window_size=window_size,
            use_v2=use_v2,
            use_checkpoint=use_checkpoint,
            dropout_path_rate=drop_path_rate,
            normalize=normalize,
        )
        self.projection = ProjectionHead(16 * feature_size, hidden_dim=proj_hidden_dim, out_dim=proj_dim)
        if encoder_off:
            for module in self.encoder_modules():
                module.requires_grad_(False)
        if decoder_off:
            for module in self.decoder_modules():
                module.requires_grad_(False)

    def encoder_modules(self) -> list[nn.Module]:
        """The encoder path: ``swinViT``, ``encoder1``-``encoder4`` and ``encoder10`` of the backbone."""
        return [getattr(self.backbone, name) for name in _ENCODER_NAMES]

    def decoder_modules(self) -> list[nn.Module]:
        """The decoder path: ``decoder1``-``decoder5`` and ``out`` of the backbone."""
        return [getattr(self.backbone, name) for name in _DECODER_NAMES]

    def backbone_state_dict(self, include_output: bool = False) -> dict[str, torch.Tensor]:
        """The backbone weights under stock ``SwinUNETR`` key names (no ``backbone.`` prefix).

        Args:
            include_output: keep the ``out.*`` layer; off by default because a fine-tuning network
                has a different number of output channels.

        Returns:
            Mapping from stock ``SwinUNETR`` parameter/buffer names to tensors.
        """
        return {
            key: value
            for key, value in self.backbone.state_dict().items()
            if include_output or not key.startswith("out.")
        }

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input of shape (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        factor = self.backbone.patch_size**5
        bad = [size for size in x.shape[2:] if size % factor]
        if bad:
            raise ValueError(
                f"spatial shape {tuple(x.shape[2:])} has sizes {bad} not divisible by {factor} "
                f"(patch size {self.backbone.patch_size} followed by 4 downsamplings)"
            )

    def forward(
        self,
        x: torch.Tensor,
        embedding_mask_ratio: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> DAEOutput:
        """Reconstruct ``x`` and project its pooled bottleneck.

        Args:
            x: (disrupted) input volume, shape (B, C, D, H, W) with D, H, W divisible by 32.
            embedding_mask_ratio: fraction of patch-embedding channels zeroed for this call, the same
                channels for every sample and token (as in the reference DAE code); 0 disables it.
            generator: random generator choosing the masked channels.

        Returns:
            ``DAEOutput(reconstruction (B, C, D, H, W), projection (B, proj_dim))``.
        """
        self._check_input(x)
        if not 0.0 <= embedding_mask_ratio <= 1.0:
            raise ValueError(f"embedding_mask_ratio must be in [0, 1], got {embedding_mask_ratio}")
        if embedding_mask_ratio == 0.0:
            return self._forward(x)

        def mask_embedding(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            mask = embedding_channel_mask(output.shape[1], embedding_mask_ratio, generator, output.device)
            return output * mask.to(output.dtype).view(1, -1, *([1] * (output.ndim - 2)))

        handle = self.backbone.swinViT.patch_embed.register_forward_hook(mask_embedding)
        try:
            return self._forward(x)
        finally:
            handle.remove()

    def _forward(self, x: torch.Tensor) -> DAEOutput:
        bb = self.backbone
        hidden = bb.swinViT(x, bb.normalize)
        enc0 = bb.encoder1(x)
        enc1 = bb.encoder2(hidden[0])
        enc2 = bb.encoder3(hidden[1])
        enc3 = bb.encoder4(hidden[2])
        dec4 = bb.encoder10(hidden[4])
        dec3 = bb.decoder5(dec4, hidden[3])
        dec2 = bb.decoder4(dec3, enc3)
        dec1 = bb.decoder3(dec2, enc2)
        dec0 = bb.decoder2(dec1, enc1)
        reconstruction = bb.out(bb.decoder1(dec0, enc0))
        projection = self.projection(hidden[4].mean(dim=(2, 3, 4)))
        return DAEOutput(reconstruction, projection)
