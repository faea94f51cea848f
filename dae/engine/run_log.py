"""What a training run records besides its checkpoints: metric files, TensorBoard and the log lines."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

__all__ = ["RunLog"]

logger = logging.getLogger(__name__)

#: per-epoch means shown in their own place of the epoch line rather than in the list of the other losses
_SHOWN_APART = ("loss", "lr", "grad_norm", "data_wait_fraction")


class RunLog:
    """The records of one training run in ``output_dir``; nothing is written before :meth:`open` enables them.

    - ``metrics/train_steps.jsonl``: one line per iteration, ``{"step", "epoch", **record}``;
    - ``metrics/epochs.jsonl``: one line per epoch, ``{"epoch", "step", "seconds", "train_*", "val_*"}``, and an
      epoch-0 line with the ``val_*`` of the initial weights when the trainer validates them (:meth:`initial`);
    - ``tensorboard/``: ``train_step/*`` every ``log_interval`` iterations, ``train/*`` and ``val/*`` per epoch,
      and the pictures.

    Args:
        output_dir: the run folder.
        log_interval: write per-iteration TensorBoard scalars every this many iterations.
    """

    def __init__(self, output_dir: str | Path, log_interval: int = 10) -> None:
        self.output_dir = Path(output_dir)
        self.metrics_dir = self.output_dir / "metrics"
        self.log_interval = max(log_interval, 1)
        self.enabled = False
        self.writer: SummaryWriter | None = None

    def open(self, global_step: int, epoch: int, headline: str = "", enabled: bool = True) -> None:
        """Start (or continue after a resume at ``global_step`` / ``epoch``) the records; log ``headline``.

        Lines written after that point by a run that crashed between two checkpoints are dropped, and so are
        the TensorBoard events after ``global_step``. With ``enabled=False`` (ranks other than 0) nothing is
        written or logged until the next :meth:`open`.
        """
        self.enabled = enabled
        if not enabled:
            return
        if headline:
            logger.info("%s", headline)
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        for name, key, last in (("train_steps.jsonl", "step", global_step), ("epochs.jsonl", "epoch", epoch)):
            path = self.metrics_dir / name
            if path.is_file():
                lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)[key] <= last]
                if last == 0:  # a fresh start keeps nothing, not even an epoch-0 record of the initial weights
                    lines = []
                path.write_text("".join(ln + "\n" for ln in lines))
        self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=global_step or None)

    def steps(self, records: Sequence[tuple[int, Mapping[str, float]]], epoch: int) -> None:
        """Record iterations ``(global_step, record)`` of ``epoch`` (1-based; steps counted after the update).

        Every record becomes a line of ``train_steps.jsonl``; those of every ``log_interval``-th step also go to
        TensorBoard.
        """
        if not self.enabled or not records:
            return
        with (self.metrics_dir / "train_steps.jsonl").open("a") as f:
            f.write("".join(json.dumps({"step": step, "epoch": epoch, **record}) + "\n" for step, record in records))
        if self.writer is not None:
            for step, record in records:
                if step % self.log_interval == 0:
                    for key, value in record.items():
                        self.writer.add_scalar(f"train_step/{key}", value, step)

    def epoch(
        self,
        epoch: int,
        max_epochs: int,
        global_step: int,
        train: Mapping[str, float],
        val: Mapping[str, float] | None,
        seconds: float,
    ) -> None:
        """Record the means of finished epoch ``epoch`` and its validation, and log one line about them."""
        if not self.enabled:
            return
        self._record_epoch(epoch, global_step, seconds, {"train": train, "val": val or {}})
        parts = ", ".join(f"{k} {v:.4f}" for k, v in train.items() if k not in _SHOWN_APART)
        message = f"epoch {epoch}/{max_epochs}  train loss {train['loss']:.4f}"
        message += f" ({parts})" if parts else ""
        message += (
            f"  lr {train['lr']:.2e}  grad-norm {train['grad_norm']:.3f}  data-wait {train['data_wait_fraction']:.0%}"
        )
        if val is not None:
            message += "  | val " + _scalars(val)
        logger.info("%s  [%.1fs]", message, seconds)

    def initial(self, val: Mapping[str, float], seconds: float) -> None:
        """Record the validation of the initial weights as epoch 0 (``{"epoch": 0, "step": 0, "val_*"}``)."""
        if not self.enabled:
            return
        self._record_epoch(0, 0, seconds, {"val": val})
        logger.info("epoch 0 (initial weights)  | val %s  [%.1fs]", _scalars(val), seconds)

    def _record_epoch(
        self, epoch: int, global_step: int, seconds: float, groups: Mapping[str, Mapping[str, float]]
    ) -> None:
        """One line of ``epochs.jsonl`` and the TensorBoard scalars of ``{"train": ..., "val": ...}``."""
        record: dict[str, Any] = {"epoch": epoch, "step": global_step, "seconds": seconds}
        for group, values in groups.items():
            record.update({f"{group}_{k}": v for k, v in values.items()})
        with (self.metrics_dir / "epochs.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for group, values in groups.items():
                for key, value in values.items():
                    self.writer.add_scalar(f"{group}/{key}", value, epoch)
            self.writer.flush()

    def pictures(self, pictures: Mapping[str, torch.Tensor], epoch: int) -> None:
        """Write ``{tag: (C, H, W) picture in [0, 1]}`` to TensorBoard at ``epoch``."""
        if self.writer is not None:
            for tag, picture in pictures.items():
                self.writer.add_image(tag, picture, epoch, dataformats="CHW")

    def history(self) -> list[dict[str, Any]]:
        """The per-epoch records so far, including epochs run before a resume."""
        path = self.metrics_dir / "epochs.jsonl"
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.is_file() else []

    def close(self, summary_keys: Sequence[str], best_metric: str, best_value: float, ckpt_dir: Path) -> None:
        """Log the first and last epoch means of ``summary_keys`` and of the validation metric, then close."""
        if not self.enabled:
            return
        history = self.history()
        trained = [h for h in history if h["epoch"] > 0]
        if trained:
            first, last = trained[0], trained[-1]
            for key in summary_keys:
                if f"train_{key}" in first:
                    logger.info(
                        "%s (train): epoch %d %.4f -> epoch %d %.4f",
                        key,
                        first["epoch"],
                        first[f"train_{key}"],
                        last["epoch"],
                        last[f"train_{key}"],
                    )
        if history:
            val_epochs = [h for h in history if f"val_{best_metric}" in h]
            if val_epochs:
                logger.info(
                    "%s (validation): epoch %d %.4f -> epoch %d %.4f; best %.4f",
                    best_metric,
                    val_epochs[0]["epoch"],
                    val_epochs[0][f"val_{best_metric}"],
                    val_epochs[-1]["epoch"],
                    val_epochs[-1][f"val_{best_metric}"],
                    best_value,
                )
        logger.info("checkpoints in %s, TensorBoard logs in %s", ckpt_dir, self.output_dir / "tensorboard")
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.enabled = False


def _scalars(values: Mapping[str, float]) -> str:
    """``"name 0.1234, ..."`` of the validation metrics shown in the log (per-class ``a/b`` keys left out)."""
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items() if "/" not in k)
