"""RAD-DINO and other DINOv2 models in the Hugging Face layout, loaded offline from a local folder.

RAD-DINO (``microsoft/rad-dino``) is a transformers ``Dinov2Model`` (ViT-B/14, 518 px, no register tokens).
A folder holding its ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``) is loaded with
:func:`load_hf_dinov2`; nothing is ever downloaded. Folders of ``dinov2_with_registers`` models load too.

:class:`RadDinoPreprocess` reproduces the model's image processor (``BitImageProcessor``: shorter side to 518
with bicubic resampling, centre crop 518x518, rescale to [0, 1], grey to RGB, normalise with the training
CXRs' mean 0.5307 and std 0.2583) on tensors, so it can run inside a MONAI/torch data pipeline.

transformers is an optional dependency (``pip install "dae[hf]"``); it is imported only when a model is loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import Dinov2Model, Dinov2WithRegistersModel

__all__ = [
    "RAD_DINO_CROP",
    "RAD_DINO_MEAN",
    "RAD_DINO_SIZE",
    "RAD_DINO_STD",
    "RadDinoPreprocess",
    "load_hf_dinov2",
]

logger = logging.getLogger(__name__)

RAD_DINO_SIZE = 518
RAD_DINO_CROP = 518
RAD_DINO_MEAN = 0.5307
RAD_DINO_STD = 0.2583

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# PIL resampling codes used by Hugging Face image processors -> torch interpolation modes.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
# Present in RAD-DINO's weights but only used for masked-image pretraining; its absence does not matter.
_OPTIONAL_KEYS = ("embeddings.mask_token",)


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            'loading Hugging Face DINOv2 / RAD-DINO models needs transformers: pip install "dae[hf]"'
        ) from err
    return transformers


def load_hf_dinov2(folder: str | Path) -> Dinov2Model | Dinov2WithRegistersModel:
    """Load a Hugging Face DINOv2 model (e.g. RAD-DINO) from a local folder, never from the network.

    The class is chosen from ``model_type`` in ``config.json``: ``"dinov2"`` gives a ``Dinov2Model``,
    ``"dinov2_with_registers"`` a ``Dinov2WithRegistersModel``. Loading uses ``local_files_only=True``.
    A weight file that leaves any model parameter uninitialised (other than the mask token, unused at
    inference) is an error rather than a silently random model.

    Args:
        folder: directory with ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``
            (possibly sharded with an ``*.index.json``).

    Returns:
        The model in eval mode, on the CPU, in float32.

    Raises:
        ImportError: when transformers is not installed.
        FileNotFoundError: when the folder, its ``config.json`` or its weights are missing.
        ValueError: for a ``model_type`` other than the two above, or weights missing model parameters.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face model folder {folder} does not exist or is not a directory")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; expected a Hugging Face model folder (e.g. RAD-DINO)")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(f"{folder} has no weights: expected one of {', '.join(_WEIGHT_FILES)}")
    model_type = json.loads(config_path.read_text()).get("model_type")

    transformers = _import_transformers()
    classes = {"dinov2": transformers.Dinov2Model, "dinov2_with_registers": transformers.Dinov2WithRegistersModel}
    if model_type not in classes:
        raise ValueError(
            f"{config_path}: model_type {model_type!r} is not a DINOv2 model; expected one of {tuple(classes)}"
        )
    model, info = classes[model_type].from_pretrained(folder, local_files_only=True, output_loading_info=True)
    missing = [key for key in info.get("missing_keys", ()) if not key.endswith(_OPTIONAL_KEYS)]
    if missing:
        raise ValueError(f"the weights in {folder} do not cover the model: missing {sorted(missing)[:5]} ...")
    if info.get("unexpected_keys"):
        logger.info("%s: ignored checkpoint keys %s", folder, sorted(info["unexpected_keys"])[:5])
    return model.float().eval()


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


class RadDinoPreprocess:
    """RAD-DINO's image processor on tensors: resize, centre crop, [0, 1], grey to RGB, normalise.

    The input is a grey or RGB image ``[1 or 3, H, W]`` (or a batch ``[B, 1 or 3, H, W]``) holding either 8-bit
    values (a ``uint8`` tensor, or float values above 1 and at most 255) or floats in [0, 1]. It is brought to
    [0, 1], resized so that its shorter side is ``size`` (or to exactly ``size`` when it is a pair, aspect not
    kept), centre-cropped to ``crop`` (top-left offset ``(H - crop) // 2`` as in transformers), clipped to
    [0, 1] (the 8-bit pipeline clips bicubic overshoot), repeated to 3 channels and normalised.

    RAD-DINO was trained on radiographs min-max scaled to [0, 255]; images in another range (e.g. raw 12-bit
    DICOM values) must be scaled first, and are rejected here.

    Args:
        size: shorter-side length after resizing, or an exact ``(height, width)``; None skips resizing.
        crop: centre-crop size (int or ``(height, width)``); None skips cropping.
        mean: normalisation mean (one value or one per RGB channel); None skips normalising.
        std: normalisation standard deviation, same form as ``mean``.
        interpolation: ``"bicubic"`` (RAD-DINO), ``"bilinear"`` or ``"nearest"``.

    Raises:
        ValueError: for a crop larger than the resized shorter side, a bad ``std`` or interpolation.
    """

    def __init__(
        self,
        size: int | Sequence[int] | None = RAD_DINO_SIZE,
        crop: int | Sequence[int] | None = RAD_DINO_CROP,
        mean: float | Sequence[float] | None = RAD_DINO_MEAN,
        std: float | Sequence[float] | None = RAD_DINO_STD,
        interpolation: str = "bicubic",
    ) -> None:
        if interpolation not in _PIL_RESAMPLE.values():
            raise ValueError(
                f"unknown interpolation {interpolation!r}; expected one of {tuple(_PIL_RESAMPLE.values())}"
            )
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.size = size if size is None or isinstance(size, int) else _pair(size)
        self.crop = None if crop is None else _pair(crop)
        if isinstance(self.size, int) and self.crop is not None and min(self.crop) > self.size:
            raise ValueError(f"crop {self.crop} is larger than the resized shorter side {self.size}")
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        if self.std is not None and (self.std <= 0).any():
            raise ValueError(f"std must be positive, got {std}")
        self.interpolation = interpolation

    @classmethod
    def from_preprocessor_config(cls, folder: str | Path) -> RadDinoPreprocess:
        """Build from the ``preprocessor_config.json`` of a Hugging Face model folder (RAD-DINO defaults if absent).

        Reads ``do_resize``/``size`` (``shortest_edge`` or ``height``/``width``), ``do_center_crop``/``crop_size``,
        ``do_normalize``/``image_mean``/``image_std`` and ``resample`` (PIL codes 0, 2, 3). ``do_rescale`` is
        not read: the input range is detected from the values (see the class docstring).

        Args:
            folder: the model folder.

        Returns:
            The transform.

        Raises:
            ValueError: for a size or resample value this transform cannot reproduce.
        """
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            logger.info("%s not found: using the RAD-DINO preprocessing defaults", path)
            return cls()
        config = json.loads(path.read_text())
        size: int | tuple[int, int] | None = None
        if config.get("do_resize", True):
            raw = config.get("size", {"shortest_edge": RAD_DINO_SIZE})
            if isinstance(raw, int):
                size = raw
            elif "shortest_edge" in raw:
                size = int(raw["shortest_edge"])
            elif {"height", "width"} <= raw.keys():
                size = (int(raw["height"]), int(raw["width"]))
            else:
                raise ValueError(f"{path}: unsupported size {raw!r}")
        crop: tuple[int, int] | None = None
        if config.get("do_center_crop", True):
            raw = config.get("crop_size", RAD_DINO_CROP)
            crop = _pair(raw) if isinstance(raw, int) else (int(raw["height"]), int(raw["width"]))
        mean = std = None
        if config.get("do_normalize", True):
            mean = config.get("image_mean", RAD_DINO_MEAN)
            std = config.get("image_std", RAD_DINO_STD)
        resample = config.get("resample", 3)
        if resample not in _PIL_RESAMPLE:
            raise ValueError(f"{path}: unsupported resample {resample!r}; expected one of {tuple(_PIL_RESAMPLE)}")
        return cls(size=size, crop=crop, mean=mean, std=std, interpolation=_PIL_RESAMPLE[resample])

    def _to_unit_range(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype == torch.uint8:
            return image.float() / 255.0
        image = image.float()
        low, high = float(image.min()), float(image.max())
        if low < 0.0 or high > 255.0:
            raise ValueError(
                f"image values span [{low:g}, {high:g}]; expected 8-bit values or floats in [0, 1] "
                "(min-max scale the image to [0, 255] first, as RAD-DINO's training data were)"
            )
        return image / 255.0 if high > 1.0 else image

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if isinstance(self.size, int):
            short, long = (height, width) if height <= width else (width, height)
            new_long = int(self.size * long / short)
            target = (self.size, new_long) if height <= width else (new_long, self.size)
        else:
            target = self.size
        if target == (height, width):
            return image
        antialias = self.interpolation != "nearest"
        return F.interpolate(image, size=target, mode=self.interpolation, antialias=antialias)

    def _center_crop(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        crop_h, crop_w = self.crop
        if crop_h > height or crop_w > width:
            raise ValueError(f"cannot crop {crop_h}x{crop_w} from an image of {height}x{width}")
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return image[..., top : top + crop_h, left : left + crop_w]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Preprocess one image ``[C, H, W]`` or a batch ``[B, C, H, W]`` with C in {1, 3}.

        Returns:
            float32 ``[3, h, w]`` (or ``[B, 3, h, w]``), normalised.

        Raises:
            ValueError: for another shape, channel count or value range.
        """
        image = torch.as_tensor(image)
        if image.ndim not in (3, 4) or image.shape[-3] not in (1, 3):
            raise ValueError(f"expected an image [1 or 3, H, W] or a batch [B, 1 or 3, H, W], got {tuple(image.shape)}")
        single = image.ndim == 3
        batch = self._to_unit_range(image[None] if single else image)
        if self.size is not None:
            batch = self._resize(batch)
        if self.crop is not None:
            batch = self._center_crop(batch)
        batch = batch.clamp(0.0, 1.0).expand(-1, 3, -1, -1)
        if self.mean is not None:
            batch = (batch - self.mean.to(batch.device)) / self.std.to(batch.device)
        batch = batch.contiguous()
        return batch[0] if single else batch

    def __repr__(self) -> str:
        mean = None if self.mean is None else self.mean.flatten().tolist()
        std = None if self.std is None else self.std.flatten().tolist()
        return (
            f"{type(self).__name__}(size={self.size}, crop={self.crop}, mean={mean}, std={std}, "
            f"interpolation={self.interpolation!r})"
        )
