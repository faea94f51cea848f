"""The training loop shared by every task: one readable class that the task trainers specialise.

A task trainer says how a batch becomes losses (:meth:`Trainer.compute_losses`) and how to validate
(:meth:`Trainer.validate`), and may hook into the one training step (:meth:`Trainer.train_step`): set more
scheduled values (:meth:`Trainer.before_step`), touch the gradients before the update
(:meth:`Trainer.before_update`), or update other networks after it (:meth:`Trainer.after_step`). This class
does the rest: mixed precision, gradient clipping, a per-iteration warm-up + cosine learning rate, DDP,
validation scheduling and best-model tracking, atomic checkpoints with exact resumption, per-iteration and
per-epoch metric files, TensorBoard and a progress bar.

The module is a little over 400 lines on purpose: the loop, its hooks, checkpointing and resumption are one
class to read top to bottom (the metric files and log lines are in :mod:`dae.engine.run_log`).
"""

from __future__ import annotations

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
from tqdm.auto import tqdm

from dae.engine.run_log import RunLog
from dae.engine.step import CLIP_MODES, backward_step
from dae.utils.checkpoint import load_checkpoint, save_checkpoint
from dae.utils.dist import all_reduce_mean, barrier, get_rank, is_distributed, is_main_process
from dae.utils.precision import amp_dtype
from dae.utils.schedules import CosineSchedule
from dae.utils.seed import capture_rng_state, restore_rng_state, seed_everything
from dae.utils.tensors import autocast, plain_tensor

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)

_VAL_SEED_OFFSET = 9973


class Trainer:
    """Epoch loop, checkpoints and logging; subclasses define the losses and the validation.

    Files written to ``output_dir`` (rank 0 only):

    - ``checkpoints/latest.pt`` after every epoch, ``checkpoints/best.pt`` when the validation metric
      improves, ``checkpoints/epoch_NNNN.pt`` every ``save_interval`` epochs; each holds ``model``,
      ``optimizer``, ``scaler``, ``epoch``, ``global_step``, the best metric and the generator states (the
      schedules are functions of ``global_step``, so they need no state), and loads with
      ``torch.load(..., weights_only=True)``;
    - ``metrics/train_steps.jsonl`` (one line per iteration) and ``metrics/epochs.jsonl`` (one per epoch);
    - ``tensorboard/`` with the losses, learning rate, gradient norm, data-wait share and pictures.

    Args:
        network: the model.
        optimizer: built over ``network``'s parameters (see :func:`dae.engine.param_groups`); the ``lr`` of
            each group is the peak of its learning-rate schedule (kept as the group's ``initial_lr``).
        train_loader: the training loader.
        output_dir: the run folder.
        max_epochs: epochs of the whole run (the learning-rate schedule spans them).
        val_loader: optional validation loader, evaluated every ``val_interval`` epochs and after the last.
        device: where to train.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` (with a gradient scaler).
        clip_grad: maximum gradient norm; 0 disables clipping (the norm is still logged).
        clip_mode: ``"global"`` (one norm over all gradients) or ``"per_parameter"`` (each parameter's
            gradient on its own, as DINO does); see :func:`dae.engine.step.clip_gradients`.
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
    #: advice appended to the error raised when the loss is not finite
    non_finite_hint: str = ""

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
        clip_mode: str = "global",
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
        self.amp, self.amp_dtype = amp, amp_dtype(amp)
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {list(CLIP_MODES)}, got {clip_mode!r}")
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
        self.clip_grad = clip_grad
        self.clip_mode = clip_mode
        self.val_interval = max(val_interval, 1)
        self.save_interval = save_interval
        self.image_interval = image_interval
        self.seed = seed
        self.epochs_per_run = epochs_per_run
        self.progress = progress
        self.rank = get_rank()

        self.steps_per_epoch = len(train_loader)
        self.total_steps = max_epochs * self.steps_per_epoch
        self.warmup_steps = min(round(warmup_epochs * self.steps_per_epoch), self.total_steps)
        self.warmup_lr = warmup_lr
        self.min_lr = min_lr
        self.lr_schedules = self._lr_schedules()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")

        self.epoch = 0
        self.global_step = 0
        self.best_value = math.inf if self.best_mode == "min" else -math.inf
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.log = RunLog(self.output_dir, log_interval)
        self._resume_path = Path(resume_from) if resume_from else self.ckpt_dir / "latest.pt"
        self._resume = bool(resume_from) or (resume and self._resume_path.is_file())
        self._rng_to_restore: dict[str, Any] | None = None
        self.ddp_model: nn.Module = self.model

    # ------------------------------------------------------------------ task hooks
    def before_step(self) -> dict[str, float]:
        """Set the scheduled values of this iteration (``self.global_step``) and return them for the record.

        The base sets the learning rate of every parameter group from its schedule (:attr:`lr_schedules`)
        and returns ``{"lr": <lr of group 0>}``. A subclass that schedules more (weight decay, momentum ...)
        calls ``super().before_step()`` and adds its values, which are logged with the losses.
        """
        for group, schedule in zip(self.optimizer.param_groups, self.lr_schedules, strict=True):
            group["lr"] = schedule(self.global_step)
        return {"lr": self.optimizer.param_groups[0]["lr"]}

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Forward one training batch; return fp32 scalar losses, the total under ``"loss"``.

        Every entry is logged; only ``"loss"`` is back-propagated.
        """
        raise NotImplementedError

    def before_update(self) -> None:
        """Called after the gradients are unscaled and clipped, before the optimizer update (nothing by default).

        E.g. DINO drops the gradients of its head's last layer during the first epochs.
        """

    def after_step(self) -> None:
        """Called after the optimizer update, ``self.global_step`` still this iteration's (nothing by default).

        E.g. DINO moves its teacher towards the student.
        """

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
    def _lr_schedules(self) -> list[CosineSchedule]:
        """One learning-rate schedule per parameter group, peaking at the group's ``initial_lr``."""
        return [
            CosineSchedule(
                peak=group.setdefault("initial_lr", group["lr"]),
                end=self.min_lr,
                total_steps=self.total_steps,
                warmup_steps=self.warmup_steps,
                start=self.warmup_lr,
            )
            for group in self.optimizer.param_groups
        ]

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
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_value": self.best_value,
            "rng": capture_rng_state(),
            **self.extra_state(),
        }

    def load(self, path: str | Path) -> None:
        """Restore the model, optimizer, scaler, counters and generators from a checkpoint.

        A ``scheduler`` entry (written by earlier versions) is ignored: the schedules follow ``global_step``,
        and each group's peak learning rate comes back with the optimizer's ``initial_lr``.
        """
        state = load_checkpoint(path, map_location="cpu")
        required = (self.model_key, "optimizer", "epoch", "global_step", "rng")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"{path} is not a resumable checkpoint of this trainer: missing {missing}")
        self.model.load_state_dict(state[self.model_key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedules = self._lr_schedules()
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
        """The one optimisation step of every trainer; returns the losses, scheduled values and gradient norm.

        :meth:`before_step`, :meth:`compute_losses`, a check that the loss is finite, then
        :func:`~dae.engine.step.backward_step` (clipping with ``clip_grad`` and ``clip_mode`` over the model's
        parameters, :meth:`before_update` before the update), then :meth:`after_step`.

        Raises:
            FloatingPointError: when the loss is not finite (nothing is updated).
        """
        scheduled = self.before_step()
        losses = self.compute_losses(batch)
        self._check_finite(losses, scheduled)
        grad_norm = backward_step(
            losses["loss"],
            self.optimizer,
            parameters=self.model.parameters(),
            scaler=self.scaler,
            clip_grad=self.clip_grad,
            clip_mode=self.clip_mode,
            before_update=self.before_update,
        )
        self.after_step()
        self.global_step += 1
        record = {k: float(v.detach()) for k, v in losses.items()}
        record.update(scheduled)
        record["grad_norm"] = float(grad_norm)
        return record

    def _check_finite(self, losses: Mapping[str, torch.Tensor], scheduled: Mapping[str, float]) -> None:
        if torch.isfinite(losses["loss"]):
            return
        message = (
            f"non-finite loss at epoch {self.epoch + 1}, step {self.global_step} ("
            + ", ".join(f"{k} {v:.3g}" for k, v in scheduled.items())
            + "): "
            + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        )
        raise FloatingPointError(f"{message}; {self.non_finite_hint}" if self.non_finite_hint else message)

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
        tic = time.perf_counter()
        for batch in self.train_loader:
            wait += time.perf_counter() - tic
            record = self.train_step(batch)
            for key, value in record.items():
                sums[key] += value
            self.log.step(self.global_step, self.epoch + 1, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            bar.update()
            tic = time.perf_counter()
        bar.close()
        means = {k: v / self.steps_per_epoch for k, v in sums.items()}
        means = {k: float(all_reduce_mean(torch.tensor(v, device=self.device))) for k, v in means.items()}
        means["data_wait_fraction"] = wait / max(time.perf_counter() - start, 1e-9)
        return means

    def history(self) -> list[dict[str, Any]]:
        """The per-epoch records of this run so far, including epochs run before a resume."""
        return self.log.history()

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
        headline = (
            f"training {self.describe()} for {self.max_epochs} epochs x {self.steps_per_epoch} iterations from epoch "
            f"{self.epoch} on {self.device} (amp={self.amp}), output {self.output_dir}"
        )
        self.log.open(self.global_step, self.epoch, headline, enabled=is_main_process())
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
                if self.best_metric not in val:
                    raise KeyError(
                        f"validation returned {sorted(val)}, without the best-model metric {self.best_metric!r}"
                    )
            self.log.epoch(self.epoch, self.max_epochs, self.global_step, train, val, time.perf_counter() - start)
            if self.image_interval and self.epoch % self.image_interval == 0 and is_main_process():
                self.log.pictures({**pictures, **self.train_pictures()}, self.epoch)
            self._save(val)
        self.log.close(self.summary_keys, self.best_metric, self.best_value, self.ckpt_dir)
        return self.history()
