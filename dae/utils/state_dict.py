"""Loading state dicts with an explicit report of what was loaded, missing, unexpected or mis-shaped."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["LoadReport", "head_keys", "load_state_dict_with_report", "strip_prefix"]

logger = logging.getLogger(__name__)

_SHOWN = 5


def head_keys(keys: Sequence[object]) -> str:
    """The first few ``keys`` joined for a message, with the count of those left out."""
    shown = ", ".join(str(k) for k in keys[:_SHOWN])
    return shown + (f", ... (+{len(keys) - _SHOWN})" if len(keys) > _SHOWN else "")


@dataclass
class LoadReport:
    """What :func:`load_state_dict_with_report` did.

    Attributes:
        loaded: keys copied into the module.
        missing: module keys absent from the checkpoint (left as they were).
        unexpected: checkpoint keys the module does not have.
        mismatched: ``(key, checkpoint shape, module shape)`` for keys present in both with different
            shapes (not loaded).
        name: what was loaded, used in messages.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    name: str = "checkpoint"

    def summary(self) -> str:
        """One line of counts followed by the first few keys of each non-empty list."""
        lines = [
            f"{self.name}: loaded {len(self.loaded)}, missing {len(self.missing)}, "
            f"unexpected {len(self.unexpected)}, shape-mismatched {len(self.mismatched)}"
        ]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"  {label}: {head_keys(keys)}")
        if self.mismatched:
            lines.append("  shape-mismatched: " + head_keys([f"{k} {ck}->{mk}" for k, ck, mk in self.mismatched]))
        return "\n".join(lines)


def strip_prefix(
    state_dict: Mapping[str, torch.Tensor], prefixes: Sequence[str] = ("module.", "backbone.")
) -> dict[str, torch.Tensor]:
    """Remove leading ``prefixes`` from every key, repeatedly (``module.backbone.x`` -> ``x``).

    Args:
        state_dict: mapping from key to tensor.
        prefixes: prefixes to remove wherever a key starts with one of them.

    Returns:
        A new dict with the stripped keys.

    Raises:
        ValueError: when two keys become the same after stripping.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        while stripped := next((p for p in prefixes if p and new_key.startswith(p)), None):
            new_key = new_key[len(stripped) :]
        if new_key in out:
            raise ValueError(f"stripping prefixes {tuple(prefixes)} maps more than one key to {new_key!r}")
        out[new_key] = value
    return out


def load_state_dict_with_report(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict_shapes: bool = True,
    name: str = "checkpoint",
) -> LoadReport:
    """Load the keys of ``state_dict`` that ``module`` has with the same shape, and report the rest.

    Missing and unexpected keys never raise; they are reported and the summary is logged.

    Args:
        module: the module to load into.
        state_dict: checkpoint tensors, keyed like ``module.state_dict()``.
        strict_shapes: raise when a key present in both has a different shape (like ``strict`` for
            missing keys in ``nn.Module.load_state_dict``); when False such keys are skipped and listed
            in ``LoadReport.mismatched``.
        name: what is being loaded, for messages.

    Returns:
        The :class:`LoadReport`.

    Raises:
        ValueError: when ``strict_shapes`` and some shapes differ (naming them), or when no key matched (with a
            few checkpoint and module keys to diagnose a prefix problem, and the shape mismatches if any).
    """
    own = module.state_dict()
    report = LoadReport(name=name)
    filtered: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
        elif value.shape != own[key].shape:
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            filtered[key] = value
    report.loaded = list(filtered)
    report.missing = [key for key in own if key not in state_dict]

    mismatched = head_keys([f"{k} {ck}->{mk}" for k, ck, mk in report.mismatched])
    if strict_shapes and report.mismatched:
        # Before the nothing-matched check: when every shared key has another shape, this is the real cause.
        raise ValueError(
            f"shape mismatches loading {name}: {mismatched} (checkpoint->module; is the module built like the "
            f"checkpoint? pass strict_shapes=False to skip them)\n{report.summary()}"
        )
    if not filtered:
        raise ValueError(
            f"no key of {name} matches the module ({len(state_dict)} checkpoint keys, {len(own)} module keys); "
            f"checkpoint keys: {head_keys(list(state_dict))}; module keys: {head_keys(list(own))}. "
            + (f"Shape-mismatched: {mismatched}." if report.mismatched else "A prefix problem? See strip_prefix.")
        )
    module.load_state_dict(filtered, strict=False)
    logger.info(report.summary())
    return report
