"""DAE pretraining: disrupt a batch of clean crops on the device, reconstruct it, contrast the modalities."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dae.disruptions import BatchDisruption
from dae.engine.trainer import Trainer
from dae.losses import DAELoss
from dae.utils.dist import all_reduce_mean
from dae.utils.pictures import orthogonal_slices_grid
from dae.utils.seed import restore_rng_state

__all__ = ["PretrainTrainer"]


class PretrainTrainer(Trainer):
    """Train a :class:`~dae.models.DisruptiveAutoencoder` with the DAE objectives.

    One iteration: take the clean crops of a batch, disrupt them on the device with ``disruption`` (noise,
    down/up-sampling, local masking), reconstruct them, and minimise ``loss_function``: the reconstruction
    loss plus the weighted cross-modal contrastive loss on the projected bottleneck. The disruption generator
    is checkpointed, so a resumed run draws the same disruptions. ``best.pt`` tracks the lowest validation
    loss; validation uses the same crops and disruptions at every call.

    Args:
        network: the model; ``forward(x, embedding_mask_ratio, generator)`` returns reconstruction and projection.
        loss_function: reconstruction + weighted contrastive loss.
        disruption: the batch disruption applied on the device.
        image_key: batch key of the clean images (B, C, X, Y, Z).
        label_key: batch key of the integer modality-group labels (B,).
        **kwargs: the loop settings of :class:`~dae.engine.trainer.Trainer` (optimizer, loaders, output_dir,
            max_epochs, amp, schedule, intervals, seed, resume, ...).
    """

    best_metric = "loss"
    best_mode = "min"
    summary_keys = ("reconstruction", "contrastive")

    def __init__(
        self,
        network: nn.Module,
        loss_function: DAELoss,
        disruption: BatchDisruption,
        image_key: str = "image",
        label_key: str = "modality_label",
        **kwargs: Any,
    ) -> None:
        super().__init__(network, **kwargs)
        self.loss_function = loss_function
        self.disruption = disruption
        self.image_key = image_key
        self.label_key = label_key
        if loss_function.contrastive_weight == 0 and hasattr(network, "projection"):
            # An unused head would make DDP wait for gradients that never come.
            network.projection.requires_grad_(False)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed + self.rank)
        self._last_images: torch.Tensor | None = None

    def describe(self) -> str:
        return f"{type(self.model).__name__} with {self.disruption!r}"

    def extra_state(self) -> dict[str, Any]:
        return {"disruption_generator": self.generator.get_state()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["disruption_generator"])

    def _batch(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.to_device(batch[self.image_key], torch.float32)
        if self.label_key in batch:
            labels = self.to_device(batch[self.label_key]).long()
        elif self.loss_function.contrastive_weight > 0:
            raise KeyError(f"the batch has no {self.label_key!r} key, needed by the contrastive loss")
        else:
            labels = torch.zeros(images.shape[0], dtype=torch.long, device=self.device)
        return images, labels

    def _reconstruct(
        self, model: nn.Module, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, Any]:
        with torch.no_grad():
            disrupted = self.disruption(images, generator=generator)
        with self.autocast():
            out = model(disrupted, embedding_mask_ratio=self.disruption.embedding_mask_ratio, generator=generator)
        return disrupted, out

    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        images, labels = self._batch(batch)
        if self.log_step:  # a copy, so that the batch is not kept alive for the pictures
            self._last_images = images[:1].clone()
        _, out = self._reconstruct(self.ddp_model, images, self.generator)
        return self.loss_function(out.reconstruction, images, out.projection, labels)

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        assert self.val_loader is not None
        outer_rng, val_seed = self.validation_seeding()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(val_seed)
        self.ddp_model.eval()
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        count = torch.zeros((), device=self.device)
        picture = None
        for batch in self.val_loader:
            images, labels = self._batch(batch)
            disrupted, out = self._reconstruct(self.ddp_model, images, generator)
            losses = self.loss_function(out.reconstruction, images, out.projection, labels)
            for key, value in losses.items():
                sums[key] += value.detach().float() * images.shape[0]
            count += images.shape[0]
            if picture is None:
                picture = orthogonal_slices_grid([images[0], disrupted[0], out.reconstruction[0].float()])
        restore_rng_state(outer_rng)
        total = all_reduce_mean(count)
        metrics = {k: float(all_reduce_mean(v) / total) for k, v in sums.items()}
        return metrics, {} if picture is None else {"val/clean_disrupted_reconstruction": picture}

    @torch.no_grad()
    def train_pictures(self) -> dict[str, torch.Tensor]:
        """Clean, disrupted and reconstructed crop of the last training image, with a fixed-seed generator."""
        if self._last_images is None:
            return {}
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed)
        was_training = self.model.training
        self.model.eval()
        disrupted, out = self._reconstruct(self.model, self._last_images, generator)
        self.model.train(was_training)
        volumes = [self._last_images[0], disrupted[0], out.reconstruction[0].float()]
        return {"train/clean_disrupted_reconstruction": orthogonal_slices_grid(volumes)}
