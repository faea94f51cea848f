"""MONAI transforms for disrupting single channel-first images ``(C, *spatial)`` in a data pipeline.

All randomness is drawn from the transform's numpy ``self.R`` in ``randomize()``, so ``set_random_state(seed)``
fully determines the output. Inputs may be numpy arrays, tensors or ``MetaTensor``; the output has the input's
type, dtype and device. A dictionary transform shares its random state with the array transform it wraps, so for
the same seed both give the same outputs, call after call. With several keys every key gets the same
randomisation (drawn for the first key present), so all keys must have the same shape.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Randomizable, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_tensor

from dae.disruptions.batch import parse_choice
from dae.disruptions.functional import (
    check_factor,
    check_mode,
    check_patch_size,
    check_ratio,
    check_variance,
    down_up_sample,
    expand_cell_mask,
    mask_grid_shape,
    num_masked_cells,
)

__all__ = [
    "RandAdditiveNoise",
    "RandAdditiveNoised",
    "RandDisruption",
    "RandDisruptiond",
    "RandDownUpSample",
    "RandDownUpSampled",
    "RandLocalMask",
    "RandLocalMaskd",
]


def _as_tensor(img: NdarrayOrTensor) -> torch.Tensor:
    return convert_to_tensor(img, track_meta=False)


def _to_input_type(out: torch.Tensor, img: NdarrayOrTensor) -> NdarrayOrTensor:
    return convert_to_dst_type(out, dst=img)[0]


class RandAdditiveNoise(RandomizableTransform):
    """With probability ``prob``, add Gaussian noise with standard deviation ``sqrt(variance)``.

    Args:
        prob: probability of applying the transform.
        variance: noise variance.
    """

    def __init__(self, prob: float = 1.0, variance: float = 0.1) -> None:
        RandomizableTransform.__init__(self, prob)
        check_variance(variance)
        self.variance = variance
        self._noise: np.ndarray | None = None

    def randomize(self, img: NdarrayOrTensor) -> None:
        """Draw the coin and, when applying, standard-normal noise of ``img``'s shape."""
        super().randomize(None)
        if self._do_transform:
            self._noise = self.R.standard_normal(tuple(img.shape))

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """Return the noisy image ``(C, *spatial)``; with ``randomize=False`` reuse the last draw."""
        if randomize:
            self.randomize(img)
        if not self._do_transform:
            return img
        x = _as_tensor(img)
        noise = torch.as_tensor(self._noise, dtype=x.dtype, device=x.device)
        return _to_input_type(x + noise * math.sqrt(self.variance), img)


class RandDownUpSample(RandomizableTransform):
    """With probability ``prob``, down-sample by ``factor`` and up-sample back (see ``down_up_sample``).

    Args:
        prob: probability of applying the transform (the only random part).
        factor: down-sampling factor, >= 1.
        mode: ``"nearest"``, ``"linear"``, ``"bilinear"`` or ``"trilinear"``.
    """

    def __init__(self, prob: float = 1.0, factor: float = 4.0, mode: str = "nearest") -> None:
        RandomizableTransform.__init__(self, prob)
        check_factor(factor)
        check_mode(mode)
        self.factor = factor
        self.mode = mode

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """Return the resampled image ``(C, *spatial)``; with ``randomize=False`` reuse the last coin."""
        if randomize:
            self.randomize(None)
        if not self._do_transform:
            return img
        return _to_input_type(down_up_sample(_as_tensor(img)[None], self.factor, self.mode)[0], img)


class RandLocalMask(RandomizableTransform):
    """With probability ``prob``, fill ``round(mask_ratio * n_cells)`` random cubic cells with ``fill_value``.

    Args:
        prob: probability of applying the transform.
        mask_ratio: fraction of grid cells to mask, in [0, 1].
        patch_size: edge length of the cubic cells (partial border cells count as cells).
        fill_value: value written into masked voxels of every channel.
    """

    def __init__(
        self, prob: float = 1.0, mask_ratio: float = 0.6, patch_size: int = 16, fill_value: float = 0.0
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        check_ratio(mask_ratio)
        check_patch_size(patch_size)
        self.mask_ratio = mask_ratio
        self.patch_size = patch_size
        self.fill_value = fill_value
        self._cell_mask: np.ndarray | None = None

    def randomize(self, img: NdarrayOrTensor) -> None:
        """Draw the coin and, when applying, the masked cells of the grid over ``img``'s spatial shape."""
        super().randomize(None)
        if self._do_transform:
            grid = mask_grid_shape(tuple(img.shape[1:]), self.patch_size)
            n_cells = math.prod(grid)
            chosen = self.R.permutation(n_cells)[: num_masked_cells(n_cells, self.mask_ratio)]
            cell_mask = np.zeros(n_cells, dtype=bool)
            cell_mask[chosen] = True
            self._cell_mask = cell_mask.reshape(grid)

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """Return the masked image ``(C, *spatial)``; with ``randomize=False`` reuse the last mask."""
        if randomize:
            self.randomize(img)
        if not self._do_transform:
            return img
        x = _as_tensor(img)
        cells = torch.as_tensor(self._cell_mask, device=x.device)[None]
        mask = expand_cell_mask(cells, self.patch_size, tuple(x.shape[1:]))[0]
        return _to_input_type(x.masked_fill(mask, self.fill_value), img)


class RandDisruption(RandomizableTransform):
    """With probability ``prob``, apply the chosen disruptions in the order noise, down/up-sampling, masking.

    Args:
        choice: steps to apply, see ``parse_choice`` (image-space masking only).
        variance: Gaussian noise variance.
        interpolate: down-sampling factor.
        resample_mode: interpolation mode of the down/up-sampling.
        mask_ratio: fraction of cells to mask.
        mask_patch_size: edge length of the masked cubic cells.
        prob: probability of applying the whole disruption.
    """

    def __init__(
        self,
        choice: str | Sequence[str] = "all",
        variance: float = 0.1,
        interpolate: float = 4.0,
        resample_mode: str = "nearest",
        mask_ratio: float = 0.6,
        mask_patch_size: int = 16,
        prob: float = 1.0,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        self.steps = parse_choice(choice)
        candidates = {
            "noise": RandAdditiveNoise(variance=variance),
            "superres": RandDownUpSample(factor=interpolate, mode=resample_mode),
            "local_mask": RandLocalMask(mask_ratio=mask_ratio, patch_size=mask_patch_size),
        }
        self.transforms: list[RandomizableTransform] = [candidates[step] for step in self.steps]
        self.set_random_state(state=self.R)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandDisruption:
        """Seed this transform; its steps share the same random state."""
        super().set_random_state(seed, state)
        for transform in self.transforms:
            transform.set_random_state(state=self.R)
        return self

    def randomize(self, img: NdarrayOrTensor) -> None:
        """Draw the coin and, when applying, every step's randomness in step order."""
        super().randomize(None)
        if self._do_transform:
            for transform in self.transforms:
                transform.randomize(img)

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> NdarrayOrTensor:
        """Return the disrupted image ``(C, *spatial)``; with ``randomize=False`` reuse the last draw."""
        if randomize:
            self.randomize(img)
        if not self._do_transform:
            return img
        for transform in self.transforms:
            img = transform(img, randomize=False)
        return img


class _RandDictWrapper(RandomizableTransform, MapTransform):
    """Apply a wrapped array transform to ``keys`` with one shared draw; the random state is shared with it."""

    def __init__(self, keys: KeysCollection, transform: RandomizableTransform, allow_missing_keys: bool) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, transform.prob)
        self.transform = transform
        self.set_random_state(state=self.R)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> Randomizable:
        """Seed this transform and the wrapped array transform with one shared random state."""
        super().set_random_state(seed, state)
        self.transform.set_random_state(state=self.R)
        return self

    def randomize(self, img: NdarrayOrTensor) -> None:
        """Draw through the wrapped transform so the sequence of draws equals the array form's."""
        self.transform.randomize(img)
        self._do_transform = self.transform._do_transform

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a shallow copy of ``data`` with the transformed images."""
        d = dict(data)
        first_key = self.first_key(d)
        if first_key == ():
            return d
        self.randomize(d[first_key])
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], randomize=False)
        return d


class RandAdditiveNoised(_RandDictWrapper):
    """Dictionary form of :class:`RandAdditiveNoise`; all keys get the same noise."""

    def __init__(
        self, keys: KeysCollection, prob: float = 1.0, variance: float = 0.1, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, RandAdditiveNoise(prob, variance), allow_missing_keys)


class RandDownUpSampled(_RandDictWrapper):
    """Dictionary form of :class:`RandDownUpSample`; all keys share the coin."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 1.0,
        factor: float = 4.0,
        mode: str = "nearest",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, RandDownUpSample(prob, factor, mode), allow_missing_keys)


class RandLocalMaskd(_RandDictWrapper):
    """Dictionary form of :class:`RandLocalMask`; all keys get the same mask."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 1.0,
        mask_ratio: float = 0.6,
        patch_size: int = 16,
        fill_value: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, RandLocalMask(prob, mask_ratio, patch_size, fill_value), allow_missing_keys)


class RandDisruptiond(_RandDictWrapper):
    """Copy each clean image to its target key, then disrupt the image (see :class:`RandDisruption`).

    Args:
        keys: image keys to disrupt.
        target_key: key(s) receiving a deep copy of the clean image, one per key in ``keys``.
        choice, variance, interpolate, resample_mode, mask_ratio, mask_patch_size, prob: as in
            :class:`RandDisruption`.
        allow_missing_keys: skip missing keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        target_key: str | Sequence[str] = "target",
        choice: str | Sequence[str] = "all",
        variance: float = 0.1,
        interpolate: float = 4.0,
        resample_mode: str = "nearest",
        mask_ratio: float = 0.6,
        mask_patch_size: int = 16,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        disruption = RandDisruption(choice, variance, interpolate, resample_mode, mask_ratio, mask_patch_size, prob)
        super().__init__(keys, disruption, allow_missing_keys)
        self.target_keys = (target_key,) if isinstance(target_key, str) else tuple(target_key)
        if len(self.target_keys) != len(self.keys):
            raise ValueError(f"need one target key per key, got keys={self.keys} and target_key={target_key!r}")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a shallow copy of ``data`` with clean copies under the target keys and disrupted images."""
        d = dict(data)
        for key, target in self.key_iterator(d, self.target_keys):
            d[target] = copy.deepcopy(d[key])
        return super().__call__(d)
