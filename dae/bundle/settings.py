"""Types and ranges of the settings the bundles share, checked before any data is read.

One table for every bundle: a rule applies to each key of this name that a bundle has, so a new bundle that
uses the same names is checked for free. Booleans written as text on the command line (``--resume false``
arrives as the string ``'false'``, which Python takes as true) are read strictly and stored as booleans.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from dae.bundle.launch import replace_value
from dae.errors import ConfigError
from dae.utils.config import str2bool
from dae.utils.paths import is_writable_folder

__all__ = ["FLAGS", "SETTINGS", "Setting", "check_settings"]


@dataclass(frozen=True)
class Setting:
    """A rule for one key: what it must be, and whether ``null`` is allowed."""

    expected: str
    accepts: Callable[[Any], bool]
    nullable: bool = False

    def problem(self, value: Any) -> str | None:
        """The reason ``value`` breaks this rule, or None."""
        if value is None:
            return None if self.nullable else f"expected {self.expected}, got null"
        try:
            ok = self.accepts(value)
        except (TypeError, ValueError):
            ok = False
        return None if ok else f"expected {self.expected}, got {value!r}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(minimum: int, nullable: bool = False) -> Setting:
    text = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    return Setting(text, lambda v: _is_int(v) and v >= minimum, nullable)


def _number(low: float, high: float = math.inf, open_low: bool = False, nullable: bool = False) -> Setting:
    bound = f"> {low}" if open_low else f">= {low}"
    text = f"a number {bound}" + (f" and <= {high}" if high != math.inf else "")
    return Setting(text, lambda v: _is_number(v) and (v > low if open_low else v >= low) and v <= high, nullable)


def _choice(*options: str, nullable: bool = False) -> Setting:
    return Setting(f"one of {', '.join(options)}", lambda v: v in options, nullable)


def _numbers(count: int, positive: bool, nullable: bool = False) -> Setting:
    kind = "positive numbers" if positive else "numbers"
    return Setting(
        f"a list of {count} {kind}",
        lambda v: (
            isinstance(v, list | tuple)
            and len(v) == count
            and all(_is_number(x) and (x > 0 or not positive) for x in v)
        ),
        nullable,
    )


def _increasing_pair(low: float, high: float) -> Setting:
    return Setting(
        f"two increasing numbers in [{low}, {high}]",
        lambda v: (
            isinstance(v, list | tuple) and len(v) == 2 and all(_is_number(x) for x in v) and low <= v[0] < v[1] <= high
        ),
    )


def _positive_ints(count: int | None = None) -> Setting:
    size = f"{count} " if count else ""
    return Setting(
        f"a list of {size}positive integers",
        lambda v: (
            isinstance(v, list | tuple)
            and len(v) > 0
            and (count is None or len(v) == count)
            and all(_is_int(x) and x > 0 for x in v)
        ),
    )


_FILE = Setting("an existing file", lambda v: isinstance(v, str | os.PathLike) and Path(v).is_file())
_OPTIONAL_FILE = Setting(_FILE.expected, _FILE.accepts, nullable=True)
_FOLDER = Setting("an existing folder", lambda v: isinstance(v, str | os.PathLike) and Path(v).is_dir())
_WRITABLE = Setting("a folder that can be created and written", is_writable_folder)

SETTINGS: dict[str, Setting] = {
    # run length and batches
    "epochs": _integer(1),
    "epochs_per_run": _integer(1, nullable=True),
    "early_stop_patience": _integer(1, nullable=True),
    "monitor_metric": _choice("knn_top1", "knn_auroc"),
    "batch_size": _integer(1),
    "total_batch_size": _integer(1),
    "probe_batch_size": _integer(1),
    "num_samples": _integer(1),
    "val_num_samples": _integer(1),
    "probe_epochs": _integer(1),
    "finetune_epochs": _integer(1),
    "num_workers": _integer(0),
    "cache_num_workers": _integer(0),
    "cache_rate": _number(0.0, 1.0),
    "cache": _choice("memory", "disk", "smart"),
    "cache_num": _integer(1),
    "replace_rate": _number(0.0, 1.0, open_low=True),
    "cache_budget_gb": _number(0.0, open_low=True, nullable=True),
    "label_fraction": _number(0.0, 1.0, open_low=True),
    "seed": _integer(0),
    # optimisation
    "lr": _number(0.0, open_low=True),
    "base_lr": _number(0.0, open_low=True),
    "head_lr": _number(0.0, open_low=True),
    "backbone_lr": _number(0.0),
    "min_lr": _number(0.0),
    "warmup_lr": _number(0.0),
    "weight_decay": _number(0.0),
    "weight_decay_end": _number(0.0),
    "warmup_epochs": _integer(0),
    "clip_grad": _number(0.0),
    "amp": _choice("none", "bf16", "fp16"),
    # intervals
    "val_interval": _integer(1),
    "log_interval": _integer(1),
    "save_interval": _integer(0),
    "image_interval": _integer(0),
    # images and networks
    "roi_size": _positive_ints(3),
    "spacing": _numbers(3, positive=True, nullable=True),
    "ct_window": _increasing_pair(-math.inf, math.inf),
    "mr_percentiles": _increasing_pair(0.0, 100.0),
    "feature_size": _integer(1),
    "depths": _positive_ints(),
    "num_heads": _positive_ints(),
    "window_size": _integer(1),
    "drop_path_rate": _number(0.0, 1.0),
    "image_size": _integer(1),
    "global_crop_size": _integer(1),
    "local_crop_size": _integer(1),
    "local_crops_number": _integer(0),
    "global_crops_scale": _increasing_pair(0.0, 1.0),
    "local_crops_scale": _increasing_pair(0.0, 1.0),
    "out_dim": _integer(1),
    "head_hidden_dim": _integer(1),
    "head_bottleneck_dim": _integer(1),
    # objectives
    "mask_ratio": _number(0.0, 1.0),
    "mm_con": _number(0.0),
    "temperature": _number(0.0, open_low=True),
    "teacher_temp": _number(0.0, open_low=True),
    "warmup_teacher_temp": _number(0.0, open_low=True),
    "student_temp": _number(0.0, open_low=True),
    "momentum_teacher": _number(0.0, 1.0),
    "koleo_weight": _number(0.0),
    "center_momentum": _number(0.0, 1.0),
    "loss_type": _choice("l1", "l2"),
    "data_check": Setting("one of deep, basic, off", lambda v: v in ("deep", "basic", "off") or v is False),
    "n_boot": _integer(0),
    # dictation to mask (logsam)
    "segmenter_kind": _choice("lite-medsam", "sam"),
    "transcriber_kind": _choice("faster-whisper", "openai-whisper", "hf-whisper", "none", nullable=True),
    "beam_size": _integer(1),
    "min_score": _number(0.0, 1.0),
    "threshold": _number(0.0, 1.0),
    "flip_probability": _number(0.0, 1.0),
    "dice_weight": _number(0.0),
    "pos_weight": _number(0.0, open_low=True),
    "peak_weight": _number(0.0),
    "negative_rate": _number(0.0),
    "box_threshold": _number(0.0, 1.0),
    "text_threshold": _number(0.0, 1.0),
    "lora_rank": _integer(1),
    "lora_alpha": _number(0.0, open_low=True),
    "lora_dropout": _number(0.0, 1.0),
    # paths
    "dataset_dir": _FOLDER,
    "datalist": _FILE,
    "test_datalist": _FILE,
    "test_dataset_dir": _FOLDER,
    "output_dir": _WRITABLE,
    "pretrained": _OPTIONAL_FILE,
    "checkpoint": _FILE,
    "pretrained_weights": _OPTIONAL_FILE,
    "resume_from": _OPTIONAL_FILE,
    "classes": _OPTIONAL_FILE,
    "infer_datalist": _OPTIONAL_FILE,
    "infer_image": _OPTIONAL_FILE,
    "infer_dictation": _OPTIONAL_FILE,
}
"""Rules by key name; a bundle's key of one of these names is checked before its data are read."""

FLAGS = frozenset(
    {
        "resume",
        "use_v2",
        "use_checkpoint",
        "encoder_off",
        "decoder_off",
        "cudnn_benchmark",
        "tf32",
        "channels_last",
        "fused_adamw",
        "compile",
        "val_hd95",
        "eval_hd95",
        "fine_tune",
        "norm_last_layer",
        "use_bn_in_head",
        "device_augmentation",
        "photometric_augmentation",
        "compare_random",
        "validate_at_start",
        "all_classes",
        "mix_modalities",
    }
)
"""Boolean keys: true/false, yes/no, 1/0, on/off are read as booleans, anything else is an error."""


def _swin_problems(values: Mapping[str, Any]) -> list[str]:
    """Relations of the Swin UNETR settings: crop size against depth, heads against stages, width."""
    depths, roi = values.get("depths"), values.get("roi_size")
    if depths is None or SETTINGS["depths"].problem(depths):
        return []
    problems = []
    factor = 2 ** (len(depths) + 1)  # patch embedding (2) and one merge per stage
    if roi is not None and not SETTINGS["roi_size"].problem(roi) and any(e % factor or e < 2 * factor for e in roi):
        problems.append(
            f"roi_size: {list(roi)} must have every edge divisible by {factor} and at least {2 * factor} "
            f"(a Swin UNETR with {len(depths)} stages shrinks it {factor}x; the bottleneck needs more than one voxel)"
        )
    heads = values.get("num_heads")
    if heads is not None and not SETTINGS["num_heads"].problem(heads) and len(heads) != len(depths):
        problems.append(f"num_heads: {list(heads)} needs one entry per stage of depths {list(depths)}")
    width = values.get("feature_size")
    if width is not None and _is_int(width) and width % 12:
        problems.append(f"feature_size: {width} must be divisible by 12 (Swin UNETR)")
    return problems


def _cache_problems(values: Mapping[str, Any]) -> list[str]:
    """Settings that a rolling cache cannot serve: a mixed order needs samples that keep their indices."""
    if values.get("mix_modalities") and values.get("cache") == "smart":
        return [
            "mix_modalities: true needs cache memory or disk: the smart cache's slots change volume every epoch, "
            "so no order can mix their modalities (set mix_modalities: false with cache: smart)"
        ]
    return []


def check_settings(parser: ConfigParser, overrides: Mapping[str, Any] = ()) -> dict[str, Any]:
    """Check every key of :data:`SETTINGS` and :data:`FLAGS` that the config has; store flags as booleans.

    Args:
        parser: the workflow's parser (values are evaluated, so paths built with ``$`` expressions are checked).
        overrides: the launch's overrides, to say which bad values came from the command line.

    Returns:
        The checked values by key.

    Raises:
        ConfigError: one line per bad key, naming the key, the value and what it must be.
    """
    keys = [k for k in parser.get() if k in SETTINGS or k in FLAGS]
    values: dict[str, Any] = {}
    problems = []
    for key in keys:
        origin = " (command line)" if key in overrides else ""
        try:
            value = parser.get_parsed_content(key)
        except Exception as error:  # the failing expression is the culprit; say which key holds it
            problems.append(f"  {key}{origin}: cannot be evaluated ({type(error).__name__}: {error})")
            continue
        if key in FLAGS:
            try:
                flag = str2bool(value)
            except (TypeError, ValueError) as error:
                problems.append(f"  {key}{origin}: {error}")
                continue
            if flag is not value:
                replace_value(parser, key, flag)
            value = flag
        else:
            reason = SETTINGS[key].problem(value)
            if reason:
                problems.append(f"  {key}{origin}: {reason}")
                continue
        values[key] = value
    problems += [f"  {p}" for p in _swin_problems(values) + _cache_problems(values)]
    if problems:
        raise ConfigError(f"{len(problems)} setting(s) cannot be used:\n" + "\n".join(problems))
    return values
