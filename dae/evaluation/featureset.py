"""Precomputed features of one data split, the input of every frozen-feature evaluation protocol."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dae.utils.checkpoint import load_checkpoint

__all__ = ["FeatureSet"]

_FORMAT_VERSION = 1


@dataclass
class FeatureSet:
    """Features, labels and ids of one split, in datalist order.

    Attributes:
        cls_blocks: ``[N, n_max, D]`` CLS tokens of the last ``n_max`` blocks after the final norm, the last
            block last. For CNNs ``n_max`` is 1 and the entry is the pooled feature.
        patch_mean: ``[N, D]`` mean of the last block's normed patch tokens, or None (CNNs).
        labels: ``[N]`` long class indices (single-label) or ``[N, C]`` float 0/1 (multi-label).
        ids: sample ids, one per row.
        class_names: names of the classes, in label order.
    """

    cls_blocks: torch.Tensor
    patch_mean: torch.Tensor | None
    labels: torch.Tensor
    ids: list[str]
    class_names: list[str]

    def __post_init__(self) -> None:
        if self.cls_blocks.ndim != 3:
            raise ValueError(f"cls_blocks must be [N, n_max, D], got shape {tuple(self.cls_blocks.shape)}")
        n, _, dim = self.cls_blocks.shape
        if self.patch_mean is not None and tuple(self.patch_mean.shape) != (n, dim):
            raise ValueError(f"patch_mean must be [{n}, {dim}], got shape {tuple(self.patch_mean.shape)}")
        if self.labels.ndim not in (1, 2) or self.labels.shape[0] != n:
            raise ValueError(f"labels must be [{n}] or [{n}, C], got shape {tuple(self.labels.shape)}")
        if len(self.ids) != n:
            raise ValueError(f"{len(self.ids)} ids for {n} samples")
        if self.labels.ndim == 2 and self.class_names and len(self.class_names) != self.labels.shape[1]:
            raise ValueError(f"{len(self.class_names)} class names for {self.labels.shape[1]} label columns")
        self.ids = list(self.ids)
        self.class_names = list(self.class_names)

    def __len__(self) -> int:
        return self.cls_blocks.shape[0]

    @property
    def n_max(self) -> int:
        """Number of blocks whose CLS token is stored."""
        return self.cls_blocks.shape[1]

    @property
    def dim(self) -> int:
        """Feature width D of one token."""
        return self.cls_blocks.shape[2]

    @property
    def cls(self) -> torch.Tensor:
        """``[N, D]`` CLS token of the last block (the pooled feature for CNNs)."""
        return self.cls_blocks[:, -1]

    @property
    def is_multilabel(self) -> bool:
        """True when the labels are ``[N, C]`` multi-hot vectors."""
        return self.labels.ndim == 2

    @property
    def num_classes(self) -> int:
        """Number of classes: the class names if given, else the label columns or the largest label + 1."""
        if self.class_names:
            return len(self.class_names)
        if self.is_multilabel:
            return self.labels.shape[1]
        return int(self.labels.max()) + 1 if len(self) else 0

    def linear_input(self, n_blocks: int, avgpool: bool) -> torch.Tensor:
        """The linear-probe input: CLS tokens of the last ``n_blocks`` blocks, then the patch mean if ``avgpool``.

        Args:
            n_blocks: how many of the last blocks to concatenate (1 to ``n_max``).
            avgpool: append the mean of the last block's patch tokens.

        Returns:
            ``[N, D * (n_blocks + avgpool)]`` float32 tensor.

        Raises:
            ValueError: if ``n_blocks`` exceeds ``n_max`` or ``avgpool`` is asked without patch tokens.
        """
        if not 1 <= n_blocks <= self.n_max:
            raise ValueError(f"n_blocks={n_blocks} but these features hold the CLS tokens of {self.n_max} block(s)")
        if avgpool and self.patch_mean is None:
            raise ValueError("avgpool=True needs patch tokens, but these features have no patch_mean (a CNN?)")
        parts = [self.cls_blocks[:, -n_blocks:].reshape(len(self), -1)]
        if avgpool:
            parts.append(self.patch_mean)
        return torch.cat(parts, dim=1).float()

    def subset(self, indices: Sequence[int] | torch.Tensor) -> FeatureSet:
        """The samples at ``indices``, in that order."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return FeatureSet(
            cls_blocks=self.cls_blocks[index],
            patch_mean=None if self.patch_mean is None else self.patch_mean[index],
            labels=self.labels[index],
            ids=[self.ids[i] for i in index.tolist()],
            class_names=list(self.class_names),
        )

    def concat(self, other: FeatureSet) -> FeatureSet:
        """This set followed by ``other`` (e.g. train + val); both must have the same layout and classes."""
        if self.cls_blocks.shape[1:] != other.cls_blocks.shape[1:]:
            raise ValueError(
                f"cannot concatenate features of shape {tuple(self.cls_blocks.shape[1:])} "
                f"and {tuple(other.cls_blocks.shape[1:])}"
            )
        if (self.patch_mean is None) != (other.patch_mean is None):
            raise ValueError("cannot concatenate a feature set with patch_mean and one without")
        if self.labels.shape[1:] != other.labels.shape[1:]:
            raise ValueError("cannot concatenate single-label and multi-label sets, or different label widths")
        if self.class_names and other.class_names and self.class_names != other.class_names:
            raise ValueError(f"class names differ: {self.class_names} vs {other.class_names}")
        patch_mean = None
        if self.patch_mean is not None and other.patch_mean is not None:
            patch_mean = torch.cat([self.patch_mean, other.patch_mean])
        return FeatureSet(
            cls_blocks=torch.cat([self.cls_blocks, other.cls_blocks]),
            patch_mean=patch_mean,
            labels=torch.cat([self.labels, other.labels]),
            ids=self.ids + other.ids,
            class_names=list(self.class_names or other.class_names),
        )

    def save(self, path: str | Path) -> Path:
        """Save with ``torch.save`` as plain tensors, lists and a dict (loadable with ``weights_only=True``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "format_version": _FORMAT_VERSION,
                "cls_blocks": self.cls_blocks.detach().cpu(),
                "patch_mean": None if self.patch_mean is None else self.patch_mean.detach().cpu(),
                "labels": self.labels.detach().cpu(),
                "ids": list(self.ids),
                "class_names": list(self.class_names),
            },
            path,
        )
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> FeatureSet:
        """Load a file written by :meth:`save`."""
        data = load_checkpoint(path, map_location=map_location)
        version = data.get("format_version")
        if version != _FORMAT_VERSION:
            raise ValueError(f"{path}: unsupported feature-file format version {version!r}")
        return cls(
            cls_blocks=data["cls_blocks"],
            patch_mean=data["patch_mean"],
            labels=data["labels"],
            ids=data["ids"],
            class_names=data["class_names"],
        )

    def save_npy(self, path: str | Path) -> Path:
        """Export the final CLS features ``[N, D]`` as a float32 NumPy ``.npy`` file (ids and labels not included)."""
        path = Path(path)
        if path.suffix != ".npy":
            path = path.with_name(path.name + ".npy")  # what np.save would do silently
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, self.cls.detach().cpu().float().numpy())
        return path
