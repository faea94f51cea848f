"""Intensity normalisation to [0, 1] dispatched on each sample's modality group (CT window or MR percentiles)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import get_track_meta
from monai.transforms import MapTransform, ScaleIntensityRange
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import convert_to_tensor

__all__ = ["ScaleIntensityByModalityd"]


class ScaleIntensityByModalityd(MapTransform):
    """Scale image intensities to [0, 1] by modality group: a fixed HU window for CT, robust percentiles for MR.

    CT values are mapped linearly from ``ct_window`` to [0, 1]. MR values are mapped from the
    ``mr_percentiles`` of the sample's foreground (voxels > 0) to [0, 1]. The group is read per sample
    from ``data[modality_key]`` (``"CT"`` or ``"MR"``, as set by :func:`dae.data.load_datalist`).
    The output is float32 and keeps the MetaTensor metadata.

    Args:
        keys: image keys to scale.
        modality_key: key of the sample's modality group.
        ct_window: HU values mapped to 0 and 1.
        mr_percentiles: lower and upper percentiles (0-100) mapped to 0 and 1 for MR.
        clip: clip the output to [0, 1].
        allow_missing_keys: do not raise if an image key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        modality_key: str = "modality_group",
        ct_window: tuple[float, float] = (-1000.0, 1000.0),
        mr_percentiles: tuple[float, float] = (0.5, 99.5),
        clip: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not ct_window[0] < ct_window[1]:
            raise ValueError(f"ct_window must be increasing, got {ct_window}.")
        if not 0.0 <= mr_percentiles[0] < mr_percentiles[1] <= 100.0:
            raise ValueError(f"mr_percentiles must be increasing within [0, 100], got {mr_percentiles}.")
        self.modality_key = modality_key
        self.ct_window = ct_window
        self.mr_percentiles = mr_percentiles
        self.clip = clip

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Scale the images of one sample.

        Raises:
            KeyError: the sample has no ``modality_key``.
            ValueError: the modality group is neither CT nor MR.
        """
        d = dict(data)
        if self.modality_key not in d:
            raise KeyError(f"Sample has no modality key '{self.modality_key}' (keys: {sorted(map(str, d))}).")
        group = str(d[self.modality_key]).upper()
        if group not in ("CT", "MR"):
            raise ValueError(
                f"Unknown modality group {d[self.modality_key]!r} in '{self.modality_key}'; expected CT or MR."
            )
        for key in self.key_iterator(d):
            img = convert_to_tensor(d[key], track_meta=get_track_meta(), dtype=torch.float32)
            d[key] = self._scale_ct(img) if group == "CT" else self._scale_mr(img)
        return d

    def _scale_ct(self, img: torch.Tensor) -> torch.Tensor:
        lo, hi = self.ct_window
        return ScaleIntensityRange(lo, hi, 0.0, 1.0, clip=self.clip, dtype=torch.float32)(img)

    def _scale_mr(self, img: torch.Tensor) -> torch.Tensor:
        # MR has no absolute intensity scale and its background is (mostly) zero: percentiles over all voxels
        # would mostly measure how much air surrounds the anatomy, so use the foreground when there is one.
        plain = convert_to_tensor(img, track_meta=False)
        foreground = plain[plain > 0]
        values = foreground if foreground.numel() > 0 else plain.reshape(-1)
        lo, hi = (float(percentile(values, q)) for q in self.mr_percentiles)
        if hi <= lo:  # constant image: no contrast to normalise
            return img * 0.0
        return ScaleIntensityRange(lo, hi, 0.0, 1.0, clip=self.clip, dtype=torch.float32)(img)
