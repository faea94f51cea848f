"""The training loop shared by every task: one readable class that the task trainers specialise.

A task trainer says how a batch becomes losses (:meth:`Trainer.compute_losses`) and how to validate
(:meth:`Trainer.validate`); this class does the rest: mixed precision, gradient clipping, a per-iteration
warm-up + cosine schedule, DDP, validation scheduling and best-model tracking, atomic checkpoints with exact
resumption, per-iteration and per-epoch metric files, TensorBoard and a progress bar.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.data.utils import set_rnd
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from dae.engine.schedules import WarmupCosineSchedule
from dae.utils.checkpoint import load_checkpoint, save_checkpoint
from dae.utils.dist import all_reduce_mean, barrier, get_rank, is_distributed, is_main_process
from dae.utils.seed import capture_rng_state, restore_rng_state, seed_everything
from dae.utils.tensors import autocast, plain_tensor

__all__ = ["AMP_DTYPES", "Trainer"]

logger = logging.getLogger(__name__)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_VAL_SEED_OFFSET = 9973


class Trainer:
    """Epoch loop, checkpoints and logging; subclasses define the losses and the validation.

    Files written to ``output_dir`` (rank 0 only):

    - ``checkpoints/latest.pt`` after every epoch, ``checkpoints/best.pt`` when the validation metric
      improves, ``checkpoints/epoch_NNNN.pt`` every ``save_interval`` epochs; each holds ``model``,
      ``optimizer``, ``scheduler``, ``scaler``, ``epoch``, ``global_step``, the best metric and the generator
      states, and loads with ``torch.load(..., weights_only=True)``;
    - ``metrics/train_steps.jsonl`` (one line per iteration) and ``metrics/epochs.jsonl`` (one per epoch);
    - ``tensorboard/`` with the losses, learning rate, gradient norm, data-wait share and pictures.

    Args:
        network: the model.
        optimizer: built over ``network``'s parameters (see :func:`dae.engine.param_groups`).
        train_loader: the training loader.
        output_dir: the run folder.
        max_epochs: epochs of the whole run (the learning-rate schedule spans them).
        val_loader: optional validation loader, evaluated every ``val_interval`` epochs and after the last.
        device: where to train.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` (with a gradient scaler).
        clip_grad: maximum gradient norm; 0 disables clipping (the norm is still logged).
        warmup_epochs: linear warm-up length in epochs (may be fractional; converted to iterations).
        warmup_lr: learning rate at the first iteration.
        min_lr: learning rate at the last iteration.
        val_interval: validate every this many epochs.
        save_interval: also keep ``epoch_NNNN.pt`` every this many epochs (0: never).
        image_interval: write TensorBoard pictures every this many epochs (0: never).
        log_interval: write per-iteration TensorBoard scalars every this many iterations.
        seed: base seed of the data order, augmentation and disruptions (rank ``r`` uses ``seed + r``).
        resume: continue from ``output_dir/checkpoints/latest.pt`` when it exists.
        resume_from: continue from this checkpoint instead (must exist).
        epochs_per_run: stop this process after this many epochs (for schedulers with time limits); the next
            launch with ``resume`` continues the same run.
        progress: show a progress bar.
    """

    #: validation metric that selects ``best.pt``, and whether lower (``"min"``) or higher is better
    best_metric: str = "loss"
    best_mode: str = "min"
    #: per-epoch means whose first and last values are printed at the end of a run
    summary_keys: tuple[str, ...] = ("loss",)
    #: checkpoint key of the trained network's state dict
    model_key: str = "model"

    def __init__(
        self,
        network: nn.Module,
        optimizer: Optimizer,
        train_loader: DataLoader,
        output_dir: str | Path,
        max_epochs: int,
        val_loader: DataLoader | None = None,
        device: str | torch.device = "cpu",
        amp: str = "none",
        clip_grad: float = 1.0,
        warmup_epochs: float = 0.0,
        warmup_lr: float = 0.0,
        min_lr: float = 0.0,
        val_interval: int = 1,
        save_interval: int = 0,
        image_interval: int = 1,
        log_interval: int = 10,
        seed: int = 0,
        resume: bool = True,
        resume_from: str | Path | None = None,
        epochs_per_run: int | None = None,
        progress: bool = True,
    ) -> None:
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
        if len(train_loader) == 0:
            raise ValueError("the training loader yields no batch: check the datalist, batch_size and drop_last")
        self.device = torch.device(device)
        self.model = network.to(self.device)
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.output_dir = Path(output_dir)
        self.max_epochs = max_epochs
        self.amp_dtype = AMP_DTYPES[amp]
        self.clip_grad = clip_grad
        self.val_interval = max(val_interval, 1)
        self.save_interval = save_interval
        self.image_interval = image_interval
        self.log_interval = max(log_interval, 1)
        self.seed = seed
        self.epochs_per_run = epochs_per_run
        self.progress = progress
        self.rank = get_rank()

        self.steps_per_epoch = len(train_loader)
        total_steps = max_epochs * self.steps_per_epoch
        self.scheduler = WarmupCosineSchedule(
            optimizer,
            total_steps=total_steps,
            warmup_steps=min(round(warmup_epochs * self.steps_per_epoch), total_steps),
            warmup_lr=warmup_lr,
            min_lr=min_lr,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")

        self.epoch = 0
        self.global_step = 0
        self.best_value = math.inf if self.best_mode == "min" else -math.inf
        self.writer: SummaryWriter | None = None
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.metrics_dir = self.output_dir / "metrics"
        self._resume_path = Path(resume_from) if resume_from else self.ckpt_dir / "latest.pt"
        self._resume = bool(resume_from) or (resume and self._resume_path.is_file())
        self._rng_to_restore: dict[str, Any] | None = None
        self.ddp_model: nn.Module = self.model

    # ------------------------------------------------------------------ task hooks
    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Forward one training batch; return fp32 scalar losses, the total under ``"loss"``."""
        raise NotImplementedError

    def validate(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Validation metrics (averaged over all ranks) and pictures ``{tag: (C, H, W) tensor in [0, 1]}``."""
        raise NotImplementedError

    def train_pictures(self) -> dict[str, torch.Tensor]:
        """Pictures of the training batch for TensorBoard (none by default)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Task state to checkpoint besides the model, optimizer, schedule and counters."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""

    # ------------------------------------------------------------------ helpers for the hooks
    def autocast(self) -> torch.autocast:
        """The mixed-precision context of this run (a no-op when ``amp`` is ``"none"``)."""
        return autocast(self.device, self.amp_dtype)

    def to_device(self, value: Any) -> torch.Tensor:
        """A batch entry as a plain tensor on the training device (MONAI metadata dropped)."""
        return plain_tensor(value).to(self.device, non_blocking=True)

    def wrap_ddp(self) -> None:
        """Wrap the model in DDP when a process group with several ranks exists (call after freezing)."""
        if is_distributed() and self.ddp_model is self.model:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=device_ids)

    def validation_seeding(self) -> tuple[dict[str, Any], int]:
        """Seed everything for a validation that is the same at every call; returns the state to restore."""
        assert self.val_loader is not None
        outer = capture_rng_state()
        val_seed = self.seed + _VAL_SEED_OFFSET + self.rank
        seed_everything(val_seed)
        set_rnd(self.val_loader.dataset, val_seed)
        return outer, val_seed

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly."""
        return {
            self.model_key: self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_value": self.best_value,
            "rng": capture_rng_state(),
            **self.extra_state(),
        }

    def load(self, path: str | Path) -> None:
        """Restore the model, optimizer, scheduler, scaler, counters and generators from a checkpoint."""
        state = load_checkpoint(path, map_location="cpu")
        required = (self.model_key, "optimizer", "scheduler", "epoch", "global_step", "rng")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"{path} is not a resumable checkpoint of this trainer: missing {missing}")
        self.model.load_state_dict(state[self.model_key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        if state.get("best_metric") == self.best_metric:
            self.best_value = float(state["best_value"])
        self.load_extra_state(state)
        self._rng_to_restore = state["rng"]
        logger.info("resumed from %s: epoch %d, step %d", path, self.epoch, self.global_step)

    def _improved(self, value: float) -> bool:
        return value < self.best_value if self.best_mode == "min" else value > self.best_value

    def _save(self, val: dict[str, float] | None) -> None:
        improved = val is not None and self._improved(val[self.best_metric])
        if improved:
            self.best_value = val[self.best_metric]
        if is_main_process():
            state = self.state_dict()
            save_checkpoint(state, self.ckpt_dir / "latest.pt")
            if improved:
                save_checkpoint(state, self.ckpt_dir / "best.pt")
            if self.save_interval and self.epoch % self.save_interval == 0:
                save_checkpoint(state, self.ckpt_dir / f"epoch_{self.epoch:04d}.pt")
        barrier()

    # ------------------------------------------------------------------ one step, one epoch
    def train_step(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """One optimisation step; returns the losses, learning rate and gradient norm."""
        losses = self.compute_losses(batch)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss at epoch {self.epoch + 1}, step {self.global_step}: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad if self.clip_grad > 0 else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.global_step += 1
        record = {k: float(v.detach()) for k, v in losses.items()}
        record.update(lr=lr, grad_norm=float(grad_norm))
        return record

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training loader; returns the epoch means (averaged over ranks)."""
        self.ddp_model.train()
        sampler = getattr(self.train_loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(self.epoch)
        # Re-seed the random transforms of an in-process loader from the (checkpointed) global generator, so
        # that a resumed run draws the same crops; worker processes are seeded by MONAI's worker_init_fn.
        set_rnd(self.train_loader.dataset, int(torch.randint(0, 2**31 - 1, (1,)).item()))

        sums: dict[str, float] = defaultdict(float)
        wait, start = 0.0, time.perf_counter()
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {self.epoch + 1}/{self.max_epochs}",
            disable=not (self.progress and is_main_process()),
            dynamic_ncols=True,
            mininterval=1.0,
        )
        steps_file = self.metrics_dir / "train_steps.jsonl"
        tic = time.perf_counter()
        for batch in self.train_loader:
            wait += time.perf_counter() - tic
            record = self.train_step(batch)
            for key, value in record.items():
                sums[key] += value
            if is_main_process():
                with steps_file.open("a") as f:
                    f.write(json.dumps({"step": self.global_step, "epoch": self.epoch + 1, **record}) + "\n")
                if self.writer is not None and self.global_step % self.log_interval == 0:
                    for key, value in record.items():
                        self.writer.add_scalar(f"train_step/{key}", value, self.global_step)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            bar.update()
            tic = time.perf_counter()
        bar.close()
        means = {k: v / self.steps_per_epoch for k, v in sums.items()}
        means = {k: float(all_reduce_mean(torch.tensor(v, device=self.device))) for k, v in means.items()}
        means["data_wait_fraction"] = wait / max(time.perf_counter() - start, 1e-9)
        return means

    # ------------------------------------------------------------------ logging
    def _log_epoch(self, train: dict[str, float], val: dict[str, float] | None, seconds: float) -> None:
        if not is_main_process():
            return
        record: dict[str, Any] = {"epoch": self.epoch, "step": self.global_step, "seconds": seconds}
        record.update({f"train_{k}": v for k, v in train.items()})
        record.update({f"val_{k}": v for k, v in (val or {}).items()})
        with (self.metrics_dir / "epochs.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        assert self.writer is not None
        for key, value in train.items():
            self.writer.add_scalar(f"train/{key}", value, self.epoch)
        for key, value in (val or {}).items():
            self.writer.add_scalar(f"val/{key}", value, self.epoch)
        self.writer.flush()
        special = ("loss", "lr", "grad_norm", "data_wait_fraction")
        parts = ", ".join(f"{k} {v:.4f}" for k, v in train.items() if k not in special)
        message = f"epoch {self.epoch}/{self.max_epochs}  train loss {train['loss']:.4f}"
        message += f" ({parts})" if parts else ""
        message += (
            f"  lr {train['lr']:.2e}  grad-norm {train['grad_norm']:.3f}  data-wait {train['data_wait_fraction']:.0%}"
        )
        if val is not None:
            message += "  | val " + ", ".join(f"{k} {v:.4f}" for k, v in val.items() if "/" not in k)
        logger.info("%s  [%.1fs]", message, seconds)

    def _log_pictures(self, pictures: Mapping[str, torch.Tensor]) -> None:
        if self.writer is not None:
            for tag, picture in pictures.items():
                self.writer.add_image(tag, picture, self.epoch, dataformats="CHW")

    def _trim_history(self) -> None:
        """Drop metric lines written after the checkpoint we resume from (a crash between two saves)."""
        for name, key, last in (("train_steps.jsonl", "step", self.global_step), ("epochs.jsonl", "epoch", self.epoch)):
            path = self.metrics_dir / name
            if path.is_file():
                lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)[key] <= last]
                path.write_text("".join(ln + "\n" for ln in lines))

    def history(self) -> list[dict[str, Any]]:
        """The per-epoch records of this run so far, including epochs run before a resume."""
        path = self.metrics_dir / "epochs.jsonl"
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.is_file() else []

    def describe(self) -> str:
        """One line on what is being trained, for the start of the log."""
        return f"{type(self.model).__name__}"

    # ------------------------------------------------------------------ the run
    def run(self) -> list[dict[str, Any]]:
        """Train until ``max_epochs`` (or ``epochs_per_run`` more epochs); returns the per-epoch history."""
        if self._resume:
            self.load(self._resume_path)
            self._resume = False
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        else:
            seed_everything(self.seed + self.rank)
        self.wrap_ddp()
        if is_main_process():
            self.metrics_dir.mkdir(parents=True, exist_ok=True)
            self._trim_history()
            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self.global_step or None)
            logger.info(
                "training %s for %d epochs x %d iterations from epoch %d on %s (amp=%s), output %s",
                self.describe(),
                self.max_epochs,
                self.steps_per_epoch,
                self.epoch,
                self.device,
                self.amp_dtype,
                self.output_dir,
            )
        last = (
            self.max_epochs if self.epochs_per_run is None else min(self.max_epochs, self.epoch + self.epochs_per_run)
        )
        while self.epoch < last:
            start = time.perf_counter()
            train = self.train_epoch()
            self.epoch += 1
            val, pictures = None, {}
            if self.val_loader is not None and (self.epoch % self.val_interval == 0 or self.epoch == self.max_epochs):
                val, pictures = self.validate()
            self._log_epoch(train, val, time.perf_counter() - start)
            if self.image_interval and self.epoch % self.image_interval == 0 and is_main_process():
                self._log_pictures({**pictures, **self.train_pictures()})
            self._save(val)
        if is_main_process():
            self._summarise()
            if self.writer is not None:
                self.writer.close()
        return self.history()

    def _summarise(self) -> None:
        history = self.history()
        if history:
            first, last = history[0], history[-1]
            for key in self.summary_keys:
                if f"train_{key}" in first:
                    logger.info(
                        "%s (train): epoch %d %.4f -> epoch %d %.4f",
                        key,
                        first["epoch"],
                        first[f"train_{key}"],
                        last["epoch"],
                        last[f"train_{key}"],
                    )
            val_epochs = [h for h in history if f"val_{self.best_metric}" in h]
            if val_epochs:
                logger.info(
                    "%s (validation): epoch %d %.4f -> epoch %d %.4f; best %.4f",
                    self.best_metric,
                    val_epochs[0]["epoch"],
                    val_epochs[0][f"val_{self.best_metric}"],
                    val_epochs[-1]["epoch"],
                    val_epochs[-1][f"val_{self.best_metric}"],
                    self.best_value,
                )
        logger.info("checkpoints in %s, TensorBoard logs in %s", self.ckpt_dir, self.output_dir / "tensorboard")
