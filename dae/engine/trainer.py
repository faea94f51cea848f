"""The training loop shared by every task: one readable class that the task trainers specialise.

A task trainer says how a batch becomes losses (:meth:`Trainer.compute_losses`) and how to validate
(:meth:`Trainer.validate`), and may hook into the one training step (:meth:`Trainer.train_step`): set more
scheduled values (:meth:`Trainer.before_step`), touch the gradients before the update
(:meth:`Trainer.before_update`), or update other networks after it (:meth:`Trainer.after_step`). This class
does the rest: mixed precision, gradient clipping, a per-iteration warm-up + cosine learning rate, DDP,
validation scheduling and best-model tracking, atomic checkpoints with exact resumption, per-iteration and
per-epoch metric files, TensorBoard and a progress bar, and the GPU speed settings (channels-last layout,
``torch.compile``; see :mod:`dae.utils.performance`).

The step never reads a device value on the host: losses, metrics and the gradient norm stay on the device and
are read together every ``log_interval`` iterations and at the end of each epoch (one transfer for all of
them); the check that the loss is finite happens then, and names the first iteration whose loss was not.

The module is close to 500 lines on purpose: the loop, its hooks, checkpointing and resumption are one
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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dae.data.seeded_loading import SeededDataset
from dae.engine.run_log import RunLog
from dae.engine.step import CLIP_MODES, backward_step
from dae.utils.checkpoint import load_resume_checkpoint, resume_path, save_checkpoint
from dae.utils.config import resolve_flag
from dae.utils.dist import all_reduce_mean, barrier, get_rank, is_distributed, is_main_process
from dae.utils.performance import channels_last, channels_last_module, compile_module
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
    - ``metrics/train_steps.jsonl`` (one line per iteration, written every ``log_interval`` iterations) and
      ``metrics/epochs.jsonl`` (one per epoch);
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
        log_interval: read the step records on the host (one synchronisation), check the loss, write them
            and the per-iteration TensorBoard scalars every this many iterations; a non-finite loss stops the
            run at the next such read, at the latest.
        seed: base seed of the data order, augmentation and disruptions (rank ``r`` uses ``seed + r``).
        resume: continue from ``output_dir/checkpoints/latest.pt`` when it exists (a bool, or a command line's
            ``"true"`` / ``"false"``); a checkpoint that cannot be read stops the run, naming it and a kept
            ``epoch_NNNN.pt`` to resume from instead.
        resume_from: continue from this checkpoint instead (must exist).
        epochs_per_run: stop this process after this many epochs (for schedulers with time limits); the next
            launch with ``resume`` continues the same run.
        progress: show a progress bar.
        early_stop_patience: stop when ``best_metric`` has not improved for this many validations in a row (None:
            train all ``max_epochs``). The count is checkpointed, so a resumed run keeps it, and a run that stopped
            early stays stopped when launched again; ``best.pt`` holds the best epoch either way.
        channels_last: keep the network's convolution weights and the batch's images and volumes in
            channels-last layout (``torch.channels_last`` / ``channels_last_3d``), which tensor-core
            convolutions prefer; the same numbers, another memory order.
        compile: compile the network with ``torch.compile`` (in place: checkpoints keep their keys).
        validate_at_start: a fresh run validates its initial weights first and records them as epoch 0 (metrics,
            TensorBoard, pictures): the reference that training has to beat. Epoch 0 never becomes ``best.pt``.
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
        early_stop_patience: int | None = None,
        channels_last: bool = False,
        compile: bool = False,
        validate_at_start: bool = False,
    ) -> None:
        self.amp, self.amp_dtype = amp, amp_dtype(amp)
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {list(CLIP_MODES)}, got {clip_mode!r}")
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
        if early_stop_patience is not None and (isinstance(early_stop_patience, bool) or early_stop_patience < 1):
            raise ValueError(f"early_stop_patience must be a positive integer or None, got {early_stop_patience!r}")
        if early_stop_patience is not None and val_loader is None:
            raise ValueError("early_stop_patience needs a validation (val_loader) to watch")
        if len(train_loader) == 0:
            raise ValueError("the training loader yields no batch: check the datalist, batch_size and drop_last")
        self.device = torch.device(device)
        # Read strictly: a command line's "false" arrives as the string 'false', which Python takes as true.
        self.channels_last = resolve_flag(channels_last, "channels_last")
        self.compile = resolve_flag(compile, "compile")
        self.model = network.to(self.device)
        if self.channels_last:
            channels_last_module(self.model)
        compile_module(self.model, self.compile)
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
        self.early_stop_patience = early_stop_patience
        self.validate_at_start = resolve_flag(validate_at_start, "validate_at_start")
        if self.validate_at_start and val_loader is None:
            raise ValueError("validate_at_start needs a validation (val_loader)")
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
        self.best_epoch = 0
        #: validations in a row without a better ``best_metric`` (for early stopping)
        self.stale_validations = 0
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.log = RunLog(self.output_dir, log_interval)
        self._resume_path = resume_path(self.output_dir, resolve_flag(resume, "resume"), resume_from)
        self._rng_to_restore: dict[str, Any] | None = None
        self.ddp_model: nn.Module = self.model
        #: True during an iteration whose records are read on the host (every ``log_interval``-th and the last of
        #: an epoch): :meth:`compute_losses` may add diagnostics that are not worth computing at every step.
        self.log_step = False

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

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor | float]:
        """Forward one training batch; return fp32 scalar losses, the total under ``"loss"``.

        Every entry is logged; only ``"loss"`` is back-propagated. Keep values on the device (no ``.item()``,
        ``float()`` or Python ``if`` on them): the loop reads them in batches. Values known on the host may be
        floats.
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

    def to_device(self, value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A batch entry as a plain tensor on the training device (MONAI metadata dropped), see :meth:`layout`."""
        return self.layout(plain_tensor(value).to(self.device, dtype=dtype, non_blocking=True))

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory layout of this run: channels-last for float images and volumes when enabled."""
        return channels_last(x) if self.channels_last and x.is_floating_point() else x

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
            "best_epoch": self.best_epoch,
            "stale_validations": self.stale_validations,
            "rng": capture_rng_state(),
            **self.extra_state(),
        }

    def load(self, path: str | Path) -> None:
        """Restore the model, optimizer, scaler, counters and generators from a checkpoint.

        A ``scheduler`` entry (written by earlier versions) is ignored: the schedules follow ``global_step``,
        and each group's peak learning rate comes back with the optimizer's ``initial_lr``.
        """
        state = load_resume_checkpoint(path)
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
            self.best_epoch = int(state.get("best_epoch", 0))
            self.stale_validations = int(state.get("stale_validations", 0))
        elif "best_metric" in state:
            logger.warning(
                "%s chose best.pt by %s, this run by %s: the best value starts afresh and the next validation "
                "overwrites best.pt",
                path,
                state["best_metric"],
                self.best_metric,
            )
        self.load_extra_state(state)
        self._rng_to_restore = state["rng"]
        logger.info("resumed from %s: epoch %d, step %d", path, self.epoch, self.global_step)

    def _stopping_early(self) -> bool:
        """Whether ``early_stop_patience`` validations in a row brought no better ``best_metric`` (logged once)."""
        if self.early_stop_patience is None or self.stale_validations < self.early_stop_patience:
            return False
        logger.info(
            "stopping early at epoch %d of %d: %s has not improved for %d validations (best %.4f at epoch %d, in "
            "best.pt)",
            self.epoch,
            self.max_epochs,
            self.best_metric,
            self.stale_validations,
            self.best_value,
            self.best_epoch,
        )
        return True

    def _validate_initial_weights(self) -> None:
        """Validate the weights the run starts from and record them as epoch 0."""
        start = time.perf_counter()
        val, pictures = self.validate()
        self.log.initial(val, time.perf_counter() - start)
        if self.image_interval and is_main_process():
            self.log.pictures(pictures, 0)

    def _improved(self, value: float) -> bool:
        return value < self.best_value if self.best_mode == "min" else value > self.best_value

    def _save(self, val: dict[str, float] | None) -> None:
        improved = val is not None and self._improved(val[self.best_metric])
        if improved:
            self.best_value, self.best_epoch, self.stale_validations = val[self.best_metric], self.epoch, 0
        elif val is not None:
            self.stale_validations += 1
        if is_main_process():
            state = self.state_dict()
            save_checkpoint(state, self.ckpt_dir / "latest.pt")
            if improved:
                save_checkpoint(state, self.ckpt_dir / "best.pt")
            if self.save_interval and self.epoch % self.save_interval == 0:
                save_checkpoint(state, self.ckpt_dir / f"epoch_{self.epoch:04d}.pt")
        barrier()

    # ------------------------------------------------------------------ one step, one epoch
    def train_step(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor | float]:
        """The one optimisation step of every trainer; returns the losses, scheduled values and gradient norm.

        :meth:`before_step`, :meth:`compute_losses`, then :func:`~dae.engine.step.backward_step` (clipping
        with ``clip_grad`` and ``clip_mode`` over the model's parameters, :meth:`before_update` before the
        update), then :meth:`after_step`. Nothing is read from the device: the losses and the gradient norm
        come back as detached device tensors (the scheduled values as floats); :meth:`train_epoch` reads them
        every ``log_interval`` iterations and stops the run on a non-finite loss.
        """
        scheduled = self.before_step()
        losses = self.compute_losses(batch)
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
        measured = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in losses.items()}
        return {**measured, **scheduled, "grad_norm": grad_norm}

    def run_iteration(
        self, batch: Mapping[str, Any], index: int, pending: list[tuple[int, dict[str, Any]]]
    ) -> list[tuple[int, dict[str, float]]]:
        """One iteration of the epoch loop on ``batch``, the ``index``-th (0-based) of its epoch.

        :meth:`train_step` with :attr:`log_step` set, its record queued in ``pending``; at a log step (every
        ``log_interval``-th iteration of the run and the last of each epoch) the queued records are read and
        written by :meth:`flush_records` and returned, else nothing is returned.
        """
        self.log_step = (self.global_step + 1) % self.log.log_interval == 0 or index == self.steps_per_epoch - 1
        pending.append((self.global_step + 1, self.train_step(batch)))
        return self.flush_records(pending) if self.log_step else []

    def flush_records(self, pending: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, float]]]:
        """Read the queued records on the host, write them to the run log, empty ``pending`` and return them.

        Raises:
            FloatingPointError: when a loss is not finite, naming the first such iteration; the records before
                it are written (the run stops before anything is checkpointed; the iterations after it were
                already run on the device).
        """
        records = self.read_records(pending)
        bad = next((i for i, (_, record) in enumerate(records) if not math.isfinite(record["loss"])), None)
        if bad is not None:
            self.log.steps(records[:bad], self.epoch + 1)
            measured = {k for k, v in pending[bad][1].items() if isinstance(v, torch.Tensor)}
            raise self._non_finite_error(*records[bad], measured)
        pending.clear()
        self.log.steps(records, self.epoch + 1)
        return records

    def read_records(self, pending: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, float]]]:
        """The records of the iterations in ``pending`` (``(global step after the update, record)``) as floats.

        All device values are read in one transfer.
        """
        values = [v for _, record in pending for v in record.values() if isinstance(v, torch.Tensor)]
        read = iter(torch.stack([v.to(self.device, torch.float32) for v in values]).tolist() if values else [])
        return [
            (step, {k: next(read) if isinstance(v, torch.Tensor) else float(v) for k, v in record.items()})
            for step, record in pending
        ]

    def _non_finite_error(self, step: int, record: Mapping[str, float], measured: set[str]) -> FloatingPointError:
        message = (
            f"non-finite loss at epoch {self.epoch + 1}, step {step - 1} ("
            + ", ".join(f"{k} {v:.3g}" for k, v in record.items() if k not in measured)
            + "): "
            + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k in measured)
        )
        return FloatingPointError(f"{message}; {self.non_finite_hint}" if self.non_finite_hint else message)

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training loader; returns the epoch means (averaged over ranks)."""
        self.ddp_model.train()
        loader = self.train_loader
        for follower in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None), loader.dataset):
            if hasattr(follower, "set_epoch"):  # DistributedSampler, dae.data.EpochSampler; a rolling cache's window
                follower.set_epoch(self.epoch)
        if not isinstance(self.train_loader.dataset, SeededDataset):
            # A plain loader: re-seed the random transforms of in-process loading from the (checkpointed) global
            # generator, so that a resumed run draws the same crops; worker processes are seeded by MONAI's
            # worker_init_fn from the same generator. A dae.data.seeded_loader needs neither: its samples are
            # seeded from (seed, epoch, index), whatever the workers.
            set_rnd(self.train_loader.dataset, int(torch.randint(0, 2**31 - 1, (1,)).item()))

        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        pending: list[tuple[int, dict[str, Any]]] = []

        def add(records: list[tuple[int, dict[str, float]]]) -> None:
            for _, record in records:
                for key, value in record.items():
                    sums[key] += value
                    counts[key] += 1
            if records:
                bar.set_postfix(loss=f"{records[-1][1]['loss']:.4f}", lr=f"{records[-1][1]['lr']:.2e}")

        wait, start = 0.0, time.perf_counter()
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {self.epoch + 1}/{self.max_epochs}",
            disable=not (self.progress and is_main_process()),
            dynamic_ncols=True,
            mininterval=1.0,
        )
        tic = time.perf_counter()
        for index, batch in enumerate(self.train_loader):
            wait += time.perf_counter() - tic
            add(self.run_iteration(batch, index, pending))
            bar.update()
            tic = time.perf_counter()
        self.log_step = False
        if pending:
            add(self.flush_records(pending))
        bar.close()
        # Means over the iterations that recorded each key (diagnostics may be computed at log steps only).
        keys = sorted(sums)
        local = torch.tensor([sums[k] / counts[k] for k in keys], device=self.device)
        means = dict(zip(keys, all_reduce_mean(local).tolist()))
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
        if self._resume_path is not None:
            self.load(self._resume_path)
            self._resume_path = None
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
        if self.validate_at_start and self.epoch == 0:
            self._validate_initial_weights()
        last = (
            self.max_epochs if self.epochs_per_run is None else min(self.max_epochs, self.epoch + self.epochs_per_run)
        )
        while self.epoch < last and not self._stopping_early():
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
