"""One feature-extraction interface over every backbone the project loads, and feature extraction to disk-ready sets.

A :class:`FeatureExtractor` maps images to a dict of

``cls``
    ``[B, D]`` the global feature: the CLS token after the final norm (ViTs), the pooled last feature map
    (ResNets, 3D Swin encoders);
``patch_grid``
    ``[B, D, H/p, W/p]`` (``[B, D, D/p, H/p, W/p]`` in 3D) the last block's normed patch tokens or feature map;
``cls_blocks``
    ``[B, n, D]`` the normed CLS tokens of the last ``n`` blocks, the last block last (``n = 1`` and the
    pooled feature for CNNs and 3D encoders).

Implementations: :class:`DinoBackboneExtractor` (our DINO-layout ViTs and ResNets), :class:`HFDinov2Extractor`
(transformers DINOv2 models such as RAD-DINO) and :class:`DAE3DExtractor` (the Swin encoder of our 3D
SwinUNETR / Disruptive Autoencoder). :func:`build_extractor` builds one from a config mapping (the backbone
from :func:`dae.models.factory.backbone_from_spec`) behind an :class:`AdaptedExtractor` that fits the loaders'
images to it, and :func:`extract_features` runs one over a loader into a
:class:`~dae.evaluation.featureset.FeatureSet`.

The interface, its implementations and the input adapter stay in one module (a little over 400 lines) so
that a new kind of backbone is added in one place.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from torch import nn

from dae.evaluation.featureset import FeatureSet
from dae.models.backbone2d import is_vit
from dae.models.dae import DisruptiveAutoencoder
from dae.models.factory import backbone_from_spec
from dae.utils.precision import amp_dtype
from dae.utils.tensors import autocast, plain_tensor

__all__ = [
    "EXTRACTORS",
    "INPUT_OPTIONS",
    "AdaptedExtractor",
    "DAE3DExtractor",
    "DinoBackboneExtractor",
    "FeatureExtractor",
    "HFDinov2Extractor",
    "build_extractor",
    "extract_features",
    "unpack_batch",
]

logger = logging.getLogger(__name__)


class FeatureExtractor(nn.Module, ABC):
    """Common interface: images in, ``{"cls", "patch_grid", "cls_blocks"}`` out (see the module docstring).

    Attributes:
        in_chans: input channels C the extractor expects.
        embed_dim: feature width D of ``cls``, of each ``cls_blocks`` entry and of the ``patch_grid`` channels.
        patch_size: input pixels (voxels) per ``patch_grid`` cell along each axis, i.e. the grid's stride.
        n_blocks: number of entries in ``cls_blocks``.
        spatial_dims: 2 for images ``[B, C, H, W]``, 3 for volumes ``[B, C, D, H, W]``.
        has_patch_tokens: whether ``patch_grid`` holds tokens distinct from ``cls`` (ViTs); False when ``cls``
            is the grid's mean (CNNs, Swin encoders), so a patch-token mean adds nothing.
    """

    in_chans: int
    embed_dim: int
    patch_size: int
    n_blocks: int
    spatial_dims: int = 2
    has_patch_tokens: bool = True

    @abstractmethod
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of ``images``: ``{"cls": [B, D], "patch_grid": [B, D, *grid], "cls_blocks": [B, n, D]}``."""


def _check_images(images: torch.Tensor, spatial_dims: int, channels: int, name: str) -> None:
    if images.ndim != spatial_dims + 2 or images.shape[1] != channels:
        axes = "D, H, W" if spatial_dims == 3 else "H, W"
        raise ValueError(f"{name} expects input of shape (B, {channels}, {axes}), got {tuple(images.shape)}")


class DinoBackboneExtractor(FeatureExtractor):
    """Features of our DINO-layout ViTs and ResNets (:func:`~dae.models.backbone2d.build_backbone`).

    ViT: one pass through the blocks gives the last ``n_last_blocks`` normed outputs; ``cls`` is the last one's
    class token (equal to ``backbone(x)``) and ``patch_grid`` its patch tokens. ResNet: ``patch_grid`` is
    ``layer4`` (stride 32), ``cls`` its global average (equal to ``backbone(x)``) and ``cls_blocks`` that
    single vector, whatever ``n_last_blocks`` says (as DINO and DINOv2ForRadiology do for CNNs).

    Args:
        backbone: a ``VisionTransformer2D`` or ``ResNet2D``.
        n_last_blocks: number of last ViT blocks whose CLS tokens form ``cls_blocks``.

    Raises:
        TypeError: for another kind of module.
        ValueError: for ``n_last_blocks`` outside 1 to the ViT's depth.
    """

    def __init__(self, backbone: nn.Module, n_last_blocks: int = 4) -> None:
        super().__init__()
        self.backbone = backbone
        self.embed_dim = int(backbone.embed_dim)
        self.in_chans = int(backbone.in_chans)
        self.is_vit = is_vit(backbone)
        if self.is_vit:
            depth = len(backbone.blocks)
            if not 1 <= n_last_blocks <= depth:
                raise ValueError(f"n_last_blocks must be in 1..{depth}, got {n_last_blocks}")
            self.patch_size = int(backbone.patch_size)
            self.n_blocks = n_last_blocks
        elif hasattr(backbone, "feature_map"):
            self.patch_size = 32
            self.n_blocks = 1
            self.has_patch_tokens = False
        else:
            raise TypeError(f"not a ViT or ResNet backbone from build_backbone: {type(backbone).__name__}")

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """See :class:`FeatureExtractor`; images are ``[B, in_chans, H, W]``."""
        _check_images(images, 2, self.in_chans, type(self).__name__)
        if not self.is_vit:
            grid = self.backbone.feature_map(images)
            pooled = grid.mean(dim=(2, 3))
            return {"cls": pooled, "patch_grid": grid, "cls_blocks": pooled[:, None]}
        outputs = self.backbone.get_intermediate_layers(images, self.n_blocks)
        last = outputs[-1]
        height, width = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        patches = last[:, self.backbone.num_prefix_tokens :]
        grid = patches.reshape(last.shape[0], height, width, -1).permute(0, 3, 1, 2)
        return {
            "cls": last[:, 0],
            "patch_grid": grid.contiguous(),
            "cls_blocks": torch.stack([out[:, 0] for out in outputs], dim=1),
        }


class HFDinov2Extractor(FeatureExtractor):
    """Features of a transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (e.g. RAD-DINO).

    ``cls`` is ``last_hidden_state[:, 0]`` (the CLS token after the final layernorm, which equals
    ``pooler_output`` in current transformers and is the version-robust choice). ``cls_blocks`` are the CLS
    tokens of the last ``n_last_blocks`` encoder layers passed through the model's final layernorm, like
    DINOv2's ``get_intermediate_layers(norm=True)``. ``patch_grid`` is the last layer's patch tokens (register
    tokens, if any, left out) as ``[B, D, H // 14, W // 14]``; the patch convolution drops any remainder, so
    inputs should be multiples of the patch size (518 for RAD-DINO).

    Args:
        model: the transformers model (see :func:`~dae.models.hf_dinov2.load_hf_dinov2`).
        n_last_blocks: number of last layers whose CLS tokens form ``cls_blocks``.

    Raises:
        ValueError: for ``n_last_blocks`` outside 1 to the number of layers.
    """

    def __init__(self, model: nn.Module, n_last_blocks: int = 4) -> None:
        super().__init__()
        config = model.config
        if not 1 <= n_last_blocks <= config.num_hidden_layers:
            raise ValueError(f"n_last_blocks must be in 1..{config.num_hidden_layers}, got {n_last_blocks}")
        self.model = model
        self.embed_dim = int(config.hidden_size)
        self.patch_size = int(config.patch_size)
        self.n_blocks = n_last_blocks
        self.in_chans = int(config.num_channels)
        self.num_register_tokens = int(getattr(config, "num_register_tokens", 0) or 0)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """See :class:`FeatureExtractor`; images are ``[B, 3, H, W]`` (normalised, e.g. by ``RadDinoPreprocess``)."""
        _check_images(images, 2, self.in_chans, type(self).__name__)
        out = self.model(pixel_values=images, output_hidden_states=True)
        last = out.last_hidden_state
        # LayerNorm acts per token, so norming only the CLS rows of earlier layers gives the same values.
        earlier = [self.model.layernorm(hidden[:, 0]) for hidden in out.hidden_states[-self.n_blocks : -1]]
        height, width = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        patches = last[:, 1 + self.num_register_tokens :]
        grid = patches.reshape(last.shape[0], height, width, -1).permute(0, 3, 1, 2)
        return {
            "cls": last[:, 0],
            "patch_grid": grid.contiguous(),
            "cls_blocks": torch.stack([*earlier, last[:, 0]], dim=1),
        }


class DAE3DExtractor(FeatureExtractor):
    """Features of the Swin encoder (``swinViT``) of our 3D SwinUNETR / :class:`DisruptiveAutoencoder`.

    ``patch_grid`` is the hidden state of one Swin stage ``[B, C, D', H', W']`` (layer-normalised when the
    SwinUNETR has ``normalize=True``, as the DAE decoder sees it), ``cls`` its global average (for the deepest
    stage, the vector the DAE projection head receives) and ``cls_blocks`` that single vector. Only the
    encoder is kept; the decoder of the given model is not referenced.

    Args:
        model: a ``DisruptiveAutoencoder`` or a stock MONAI ``SwinUNETR`` (3D).
        stage: hidden state to use: 0 is the patch embedding (C = feature_size, stride 2), 1-4 the Swin stages
            (C = feature_size * 2**stage, stride 2**(stage + 1)); 4 (the bottleneck) by default.

    Raises:
        TypeError: for another kind of module.
        ValueError: for a stage outside 0-4.
    """

    spatial_dims = 3
    has_patch_tokens = False
    n_blocks = 1

    def __init__(self, model: nn.Module, stage: int = 4) -> None:
        super().__init__()
        swin = model.backbone if isinstance(model, DisruptiveAutoencoder) else model
        if not isinstance(swin, SwinUNETR):
            raise TypeError(f"expected a DisruptiveAutoencoder or SwinUNETR, got {type(model).__name__}")
        if not 0 <= stage <= 4:
            raise ValueError(f"stage must be in 0..4, got {stage}")
        self.swin_vit = swin.swinViT
        self.normalize = bool(swin.normalize)
        self.stage = stage
        self.in_chans = int(self.swin_vit.patch_embed.proj.in_channels)
        self.embed_dim = int(self.swin_vit.embed_dim) * 2**stage
        self.patch_size = int(swin.patch_size) * 2**stage

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """See :class:`FeatureExtractor`; volumes are ``[B, in_chans, D, H, W]`` with sizes divisible by 32."""
        _check_images(images, 3, self.in_chans, type(self).__name__)
        bad = [size for size in images.shape[2:] if size % 32]
        if bad:
            raise ValueError(f"spatial shape {tuple(images.shape[2:])} has sizes {bad} not divisible by 32")
        grid = self.swin_vit(images, self.normalize)[self.stage]
        pooled = grid.mean(dim=(2, 3, 4))
        return {"cls": pooled, "patch_grid": grid, "cls_blocks": pooled[:, None]}


class AdaptedExtractor(FeatureExtractor):
    """An extractor behind the input adaptation its backbone expects, for loaders of images in [0, 1].

    Casts to float32, resizes 2D images to ``input_size`` squares (bicubic, antialiased) when given, repeats a
    grey channel to the extractor's ``in_chans``, and normalises with ``mean`` / ``std`` when given (e.g.
    RAD-DINO: 518, 0.5307, 0.2583). The extractor's attributes are those of the wrapped one.

    Raises:
        ValueError: for only one of ``mean`` and ``std``, or ``input_size`` on a 3D extractor.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        input_size: int | None = None,
        mean: float | None = None,
        std: float | None = None,
    ) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if input_size is not None and extractor.spatial_dims != 2:
            raise ValueError("input_size resizes 2D images only")
        self.extractor, self.input_size, self.mean, self.std = extractor, input_size, mean, std
        self.in_chans = int(extractor.in_chans)
        self.embed_dim, self.patch_size, self.n_blocks = extractor.embed_dim, extractor.patch_size, extractor.n_blocks
        self.spatial_dims, self.has_patch_tokens = extractor.spatial_dims, extractor.has_patch_tokens

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        """The images as the wrapped extractor expects them."""
        x = images.float()
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bicubic", antialias=True, align_corners=False)
        if x.shape[1] == 1 and self.in_chans > 1:
            x = x.expand(-1, self.in_chans, *x.shape[2:])
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The wrapped extractor's features of the adapted images."""
        return self.extractor(self.adapt(images))


#: extractor class and its option key, per backbone kind (see :mod:`dae.models.factory` for the backbone keys)
EXTRACTORS: dict[str, tuple[type[FeatureExtractor], str]] = {
    "dino": (DinoBackboneExtractor, "n_last_blocks"),
    "hf_dinov2": (HFDinov2Extractor, "n_last_blocks"),
    "dae3d": (DAE3DExtractor, "stage"),
}
#: input options of every spec (see :class:`AdaptedExtractor`)
INPUT_OPTIONS = ("input_size", "mean", "std")


def build_extractor(spec: Mapping[str, Any]) -> AdaptedExtractor:
    """The feature extractor of a backbone spec, behind the input adapter the spec asks for.

    The spec holds the backbone keys of :func:`~dae.models.factory.backbone_from_spec`, the extractor option of
    its kind (``n_last_blocks`` for ``dino`` and ``hf_dinov2``, 4 by default; ``stage`` for ``dae3d``, 4 by
    default) and the input options ``input_size``, ``mean`` and ``std`` of :class:`AdaptedExtractor`.

    Returns:
        The adapted extractor (its ``extractor`` is the :class:`DinoBackboneExtractor`, :class:`HFDinov2Extractor`
        or :class:`DAE3DExtractor`), in eval mode, on the CPU.

    Raises:
        ValueError: for an unknown kind, a missing or unknown key (see
            :func:`~dae.models.factory.check_backbone_spec`) or a bad option; loader errors propagate.
    """
    options = [EXTRACTORS[spec["kind"]][1]] if spec.get("kind") in EXTRACTORS else []
    backbone = backbone_from_spec(spec, extra_keys=(*options, *INPUT_OPTIONS))
    extractor_class, option = EXTRACTORS[spec["kind"]]
    extractor = extractor_class(backbone, **({option: spec[option]} if option in spec else {}))
    return AdaptedExtractor(extractor, *(spec.get(key) for key in INPUT_OPTIONS)).eval()


def unpack_batch(batch: Any, image_key: str, label_key: str | None) -> tuple[torch.Tensor, Any]:
    """Images and labels (or None) of a dict batch or an ``(images, labels, ...)`` tuple batch."""
    if isinstance(batch, Mapping):
        if image_key not in batch:
            raise KeyError(f"batch has no {image_key!r} entry (keys: {sorted(batch)})")
        if label_key is not None and label_key not in batch:
            raise KeyError(f"batch has no {label_key!r} entry (keys: {sorted(batch)}); pass label_key=None")
        return batch[image_key], None if label_key is None else batch[label_key]
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if label_key is not None and len(batch) > 1 else None)
    return batch, None


def _batch_ids(batch: Any, id_key: str | None, start: int, size: int) -> list[str]:
    if id_key is None:
        return [str(i) for i in range(start, start + size)]
    if not isinstance(batch, Mapping) or id_key not in batch:
        raise KeyError(f"id_key {id_key!r} not found in the batch")
    ids = batch[id_key]
    return [str(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor,
    loader: Iterable[Any],
    image_key: str = "image",
    label_key: str | None = "label",
    id_key: str | None = None,
    class_names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    amp: str = "none",
) -> FeatureSet:
    """Run ``extractor`` over ``loader`` and collect CLS blocks, patch-token means, labels and ids in loader order.

    The extractor is moved to ``device`` and put in eval mode (and left so); no gradients are kept. Features are
    stored as float32 on the CPU, so mixed precision (``amp``) only changes the computation.

    Args:
        extractor: the feature extractor.
        loader: yields dict batches (``image_key``, ``label_key``, ``id_key``) or ``(images, labels)`` tuples.
        image_key: key of the images.
        label_key: key of the labels (``[B]`` class indices or ``[B, C]`` multi-hot); None for unlabelled data,
            which gets label -1.
        id_key: key of per-sample ids (strings or numbers); None numbers the samples 0, 1, ... in loader order.
        class_names: class names stored in the set; by default ``"0"``, ``"1"``, ... up to the largest label
            (or the label width for multi-hot labels); empty for unlabelled data.
        device: where to run the extractor.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` (see :func:`dae.utils.precision.amp_dtype`).

    Returns:
        The :class:`FeatureSet`; ``patch_mean`` (the mean of the last block's patch tokens) is None when the
        extractor has no patch tokens distinct from its pooled feature.

    Raises:
        ValueError: when the loader yields no sample.
        KeyError: when a batch lacks one of the keys.
    """
    device, dtype = torch.device(device), amp_dtype(amp)
    extractor.to(device).eval()
    cls_blocks: list[torch.Tensor] = []
    patch_means: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    ids: list[str] = []
    for batch in loader:
        images, batch_labels = unpack_batch(batch, image_key, label_key)
        images = plain_tensor(images).to(device)
        with autocast(device, dtype):
            out = extractor(images)
        size = images.shape[0]
        cls_blocks.append(out["cls_blocks"].float().cpu())
        if extractor.has_patch_tokens:
            patch_means.append(out["patch_grid"].flatten(2).mean(dim=2).float().cpu())
        if batch_labels is None:
            labels.append(torch.full((size,), -1, dtype=torch.long))
        else:
            batch_labels = plain_tensor(batch_labels).cpu()
            labels.append(batch_labels.reshape(size, -1).squeeze(1) if batch_labels.ndim > 1 else batch_labels)
        ids += _batch_ids(batch, id_key, len(ids), size)
    if not ids:
        raise ValueError("the loader yielded no sample")
    all_labels = torch.cat(labels)
    if all_labels.ndim == 1:
        all_labels = all_labels.long()
    if class_names is None:
        if label_key is None:
            class_names = []
        else:
            count = all_labels.shape[1] if all_labels.ndim == 2 else int(all_labels.max()) + 1
            class_names = [str(i) for i in range(count)]
    features = FeatureSet(
        cls_blocks=torch.cat(cls_blocks),
        patch_mean=torch.cat(patch_means) if patch_means else None,
        labels=all_labels,
        ids=ids,
        class_names=list(class_names),
    )
    logger.info(
        "extracted features of %d samples: cls_blocks %s, patch_mean %s",
        len(features),
        tuple(features.cls_blocks.shape),
        None if features.patch_mean is None else tuple(features.patch_mean.shape),
    )
    return features
