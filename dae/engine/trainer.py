"""The DAE pretraining loop: one readable class, used by the ``dae_pretrain`` bundle.

One iteration: take a batch of clean crops, disrupt it on the device (noise, down/up-sampling, local
masking), reconstruct it, and minimise the reconstruction loss plus the weighted cross-modal contrastive
loss. Around that: mixed precision, gradient clipping, a per-iteration warm-up + cosine schedule, DDP,
validation, atomic checkpoints with exact resumption, TensorBoard and a progress bar.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
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

from dae.disruptions import BatchDisruption
from dae.engine.schedules import WarmupCosineSchedule
from dae.engine.visualize import orthogonal_slices_grid
from dae.losses import DAELoss
from dae.utils.checkpoint import load_checkpoint, save_checkpoint
from dae.utils.dist import all_reduce_mean, barrier, get_rank, is_distributed, is_main_process
from dae.utils.seed import capture_rng_state, restore_rng_state, seed_everything

__all__ = ["PretrainTrainer"]

logger = logging.getLogger(__name__)

_AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_VAL_SEED_OFFSET = 9973


class PretrainTrainer:
    """Train a :class:`~dae.models.DisruptiveAutoencoder` with the DAE objectives.

    Files written to ``output_dir`` (rank 0 only):

    - ``checkpoints/latest.pt`` after every epoch, ``checkpoints/best.pt`` when the validation loss improves,
      ``checkpoints/epoch_NNNN.pt`` every ``save_interval`` epochs; each holds ``model``, ``optimizer``,
      ``scheduler``, ``scaler``, ``epoch``, ``global_step``, ``best_val_loss`` and the generator states;
    - ``metrics/train_steps.jsonl`` (one line per iteration) and ``metrics/epochs.jsonl`` (one per epoch);
    - ``tensorboard/`` with losses, learning rate, gradient norm, data-wait share and image grids.

    Args:
        network: the model; its ``forward(x, embedding_mask_ratio, generator)`` returns reconstruction and projection.
        loss_function: reconstruction + weighted contrastive loss.
        disruption: the batch disruption applied on the device.
        optimizer: built over ``network``'s parameters (see :func:`dae.engine.param_groups`).
        train_loader: yields dicts with ``image_key`` (B, C, X, Y, Z) and ``label_key`` (B,) modality labels.
        output_dir: the run folder.
        max_epochs: epochs of the whole run (the learning-rate schedule spans them).
        val_loader: optional validation loader, evaluated every ``val_interval`` epochs.
        device: where to train.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` (with a gradient scaler).
        clip_grad: maximum gradient norm; 0 disables clipping (the norm is still logged).
        warmup_epochs: linear warm-up length in epochs (may be fractional; converted to iterations).
        warmup_lr: learning rate at the first iteration.
        min_lr: learning rate at the last iteration.
        val_interval: validate every this many epochs (and after the last one).
        save_interval: also keep ``epoch_NNNN.pt`` every this many epochs (0: never).
        image_interval: write TensorBoard image grids every this many epochs (0: never).
        log_interval: write per-iteration TensorBoard scalars every this many iterations.
        seed: base seed of the data order, crops and disruptions (rank ``r`` uses ``seed + r``).
        resume: continue from ``output_dir/checkpoints/latest.pt`` when it exists.
        resume_from: continue from this checkpoint instead (must exist).
        epochs_per_run: stop this process after this many epochs (for schedulers with time limits); the
            next launch with ``resume`` continues the same run.
        image_key: batch key of the clean images.
        label_key: batch key of the integer modality-group labels.
        progress: show a progress bar.
    """

    def __init__(
        self,
        network: nn.Module,
        loss_function: DAELoss,
        disruption: BatchDisruption,
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
        image_key: str = "image",
        label_key: str = "modality_label",
        progress: bool = True,
    ) -> None:
        if amp not in _AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(_AMP_DTYPES)}, got {amp!r}")
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
        if len(train_loader) == 0:
            raise ValueError("the training loader yields no batch: check the datalist, batch_size and drop_last")
        self.device = torch.device(device)
        self.model = network.to(self.device)
        self.loss_function = loss_function
        self.disruption = disruption
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.output_dir = Path(output_dir)
        self.max_epochs = max_epochs
        self.amp_dtype = _AMP_DTYPES[amp]
        self.clip_grad = clip_grad
        self.val_interval = max(val_interval, 1)
        self.save_interval = save_interval
        self.image_interval = image_interval
        self.log_interval = max(log_interval, 1)
        self.seed = seed
        self.epochs_per_run = epochs_per_run
        self.image_key = image_key
        self.label_key = label_key
        self.progress = progress
        self.rank = get_rank()

        if loss_function.contrastive_weight == 0 and hasattr(network, "projection"):
            # An unused head would make DDP wait for gradients that never come.
            network.projection.requires_grad_(False)
        self.ddp_model: nn.Module = self.model
        if is_distributed():
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=device_ids)

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
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed + self.rank)

        self.epoch = 0
        self.global_step = 0
        self.best_val_loss = math.inf
        self._rng_to_restore: dict[str, Any] | None = None
        self._last_images: torch.Tensor | None = None
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.metrics_dir = self.output_dir / "metrics"
        checkpoint = Path(resume_from) if resume_from else self.ckpt_dir / "latest.pt"
        if resume_from or (resume and checkpoint.is_file()):
            self.load(checkpoint)
        self.writer: SummaryWriter | None = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_val_loss": self.best_val_loss,
            "rng": capture_rng_state(),
            "disruption_generator": self.generator.get_state(),
        }

    def load(self, path: str | Path) -> None:
        """Restore the model, optimizer, scheduler, scaler, counters and generators from a checkpoint."""
        state = load_checkpoint(path, map_location="cpu")
        missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "global_step", "rng") if k not in state]
        if missing:
            raise ValueError(f"{path} is not a resumable pretraining checkpoint: missing {missing}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.best_val_loss = float(state.get("best_val_loss", math.inf))
        self.generator.set_state(state["disruption_generator"])
        self._rng_to_restore = state["rng"]
        logger.info("resumed from %s: epoch %d, step %d", path, self.epoch, self.global_step)

    def _save(self, val_loss: float | None) -> None:
        improved = val_loss is not None and val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = val_loss
        if is_main_process():
            state = self.state_dict()
            save_checkpoint(state, self.ckpt_dir / "latest.pt")
            if improved:
                save_checkpoint(state, self.ckpt_dir / "best.pt")
            if self.save_interval and self.epoch % self.save_interval == 0:
                save_checkpoint(state, self.ckpt_dir / f"epoch_{self.epoch:04d}.pt")
        barrier()

    # ------------------------------------------------------------------ one step
    def _batch(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        images = batch[self.image_key]
        images = images.as_tensor() if hasattr(images, "as_tensor") else images
        labels = batch.get(self.label_key)
        if labels is None and self.loss_function.contrastive_weight > 0:
            raise KeyError(f"the batch has no {self.label_key!r} key, needed by the contrastive loss")
        labels = torch.as_tensor(labels).to(self.device).long() if labels is not None else None
        return images.to(self.device, non_blocking=True).float(), labels

    def _forward(
        self, images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            disrupted = self.disruption(images, generator=generator)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.ddp_model(
                disrupted, embedding_mask_ratio=self.disruption.embedding_mask_ratio, generator=generator
            )
        if labels is None:
            labels = torch.zeros(images.shape[0], dtype=torch.long, device=self.device)
        losses = self.loss_function(out.reconstruction, images, out.projection, labels)
        return disrupted, out.reconstruction, losses

    def train_step(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """One optimisation step; returns the losses, learning rate and gradient norm."""
        images, labels = self._batch(batch)
        self._last_images = images[:1].detach()
        _, _, losses = self._forward(images, labels, self.generator)
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

    # ------------------------------------------------------------------ epochs
    def train_epoch(self) -> dict[str, float]:
        """One pass over the training loader; returns the epoch means."""
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
        steps_file = self.metrics_dir / "train_steps.jsonl"
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
        n = self.steps_per_epoch
        means = {k: v / n for k, v in sums.items()}
        means = {k: float(all_reduce_mean(torch.tensor(v, device=self.device))) for k, v in means.items()}
        means["data_wait_fraction"] = wait / max(time.perf_counter() - start, 1e-9)
        return means

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, float], list[torch.Tensor] | None]:
        """Mean validation losses over all ranks, with the same crops and disruptions at every call.

        Returns the losses and, for the first validation sample, its clean, disrupted and reconstructed crops.
        """
        assert self.val_loader is not None
        outer_rng = capture_rng_state()
        val_seed = self.seed + _VAL_SEED_OFFSET + self.rank
        seed_everything(val_seed)
        set_rnd(self.val_loader.dataset, val_seed)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(val_seed)
        self.ddp_model.eval()
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        count = torch.zeros((), device=self.device)
        example = None
        for batch in self.val_loader:
            images, labels = self._batch(batch)
            disrupted, reconstruction, losses = self._forward(images, labels, generator)
            for key, value in losses.items():
                sums[key] += value.detach().float() * images.shape[0]
            count += images.shape[0]
            if example is None:
                example = [images[0], disrupted[0], reconstruction[0].float()]
        restore_rng_state(outer_rng)
        total = all_reduce_mean(count)
        means = {k: float(all_reduce_mean(v) / total) for k, v in sums.items()}
        return means, example

    # ------------------------------------------------------------------ logging
    def _log_epoch(self, train: dict[str, float], val: dict[str, float] | None, seconds: float) -> None:
        if not is_main_process():
            return
        record: dict[str, Any] = {"epoch": self.epoch, "step": self.global_step, "seconds": seconds}
        record.update({f"train_{k}": v for k, v in train.items()})
        if val is not None:
            record.update({f"val_{k}": v for k, v in val.items()})
        with (self.metrics_dir / "epochs.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        assert self.writer is not None
        for key, value in train.items():
            self.writer.add_scalar(f"train/{key}", value, self.epoch)
        for key, value in (val or {}).items():
            self.writer.add_scalar(f"val/{key}", value, self.epoch)
        self.writer.flush()
        message = (
            f"epoch {self.epoch}/{self.max_epochs}  train loss {train['loss']:.4f} "
            f"(reconstruction {train['reconstruction']:.4f}, contrastive {train['contrastive']:.4f})  "
            f"lr {train['lr']:.2e}  grad-norm {train['grad_norm']:.3f}  data-wait {train['data_wait_fraction']:.0%}"
        )
        if val is not None:
            message += f"  | val loss {val['loss']:.4f} (reconstruction {val['reconstruction']:.4f})"
        logger.info("%s  [%.1fs]", message, seconds)

    @torch.no_grad()
    def _preview(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Clean, disrupted and reconstructed crop of one training image, with a fixed-seed generator."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed)
        was_training = self.model.training
        self.model.eval()
        disrupted = self.disruption(images, generator=generator)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.model(disrupted, embedding_mask_ratio=self.disruption.embedding_mask_ratio, generator=generator)
        self.model.train(was_training)
        return [images[0], disrupted[0], out.reconstruction[0].float()]

    def _log_images(self, tag: str, volumes: Iterable[torch.Tensor]) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, orthogonal_slices_grid(list(volumes)), self.epoch, dataformats="CHW")

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

    # ------------------------------------------------------------------ the run
    def run(self) -> list[dict[str, Any]]:
        """Train until ``max_epochs`` (or ``epochs_per_run`` more epochs); returns the per-epoch history."""
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        else:
            seed_everything(self.seed + self.rank)
        if is_main_process():
            self.metrics_dir.mkdir(parents=True, exist_ok=True)
            self._trim_history()
            self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self.global_step or None)
            logger.info(
                "training %d epochs x %d iterations from epoch %d on %s (amp=%s), disruption %r, output %s",
                self.max_epochs,
                self.steps_per_epoch,
                self.epoch,
                self.device,
                self.amp_dtype,
                self.disruption,
                self.output_dir,
            )
        stop_at = (
            self.max_epochs if self.epochs_per_run is None else min(self.max_epochs, self.epoch + self.epochs_per_run)
        )
        while self.epoch < stop_at:
            start = time.perf_counter()
            train = self.train_epoch()
            self.epoch += 1
            val, example = None, None
            if self.val_loader is not None and (self.epoch % self.val_interval == 0 or self.epoch == self.max_epochs):
                val, example = self.validate()
            self._log_epoch(train, val, time.perf_counter() - start)
            if self.image_interval and self.epoch % self.image_interval == 0 and is_main_process():
                if example is not None:
                    self._log_images("val/clean_disrupted_reconstruction", example)
                if self._last_images is not None:
                    self._log_images("train/clean_disrupted_reconstruction", self._preview(self._last_images))
            self._save(val["loss"] if val is not None else None)
        if is_main_process():
            self._summarise()
            if self.writer is not None:
                self.writer.close()
        return self.history()

    def _summarise(self) -> None:
        history = self.history()
        if len(history) >= 1:
            first, last = history[0], history[-1]
            logger.info(
                "reconstruction loss (train): epoch %d %.4f -> epoch %d %.4f",
                first["epoch"],
                first["train_reconstruction"],
                last["epoch"],
                last["train_reconstruction"],
            )
            val_epochs = [h for h in history if "val_reconstruction" in h]
            if val_epochs:
                logger.info(
                    "reconstruction loss (validation): epoch %d %.4f -> epoch %d %.4f; best total %.4f",
                    val_epochs[0]["epoch"],
                    val_epochs[0]["val_reconstruction"],
                    val_epochs[-1]["epoch"],
                    val_epochs[-1]["val_reconstruction"],
                    self.best_val_loss,
                )
        logger.info("checkpoints in %s, TensorBoard logs in %s", self.ckpt_dir, self.output_dir / "tensorboard")
