"""DINO self-distillation loss (Caron et al., 2021) with a centred, sharpened teacher and collapse diagnostics.

The maths follows the reference ``DINOLoss`` of facebookresearch/dino. Two things differ: the loss is always
computed in fp32 outside autocast (the reference ran it in fp16 under AMP), and the centre is all-reduced
only when a process group is running, whereas the reference called ``dist.all_reduce`` unconditionally and
so could not run in a single process without one. The returned diagnostics extend those of DAX.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dae.utils.dist import all_reduce_mean
from dae.utils.schedules import CosineSchedule

__all__ = ["DINOLoss"]


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student over all view pairs.

    With ``ncrops`` student views (the 2 global views first, then the local ones) and the teacher's output
    for the 2 global views, the loss is the mean over the ``2 * ncrops - 2`` pairs ``(iq, v)`` with
    ``iq in {0, 1}`` and ``v != iq`` of::

        mean_batch( sum_k -softmax((t_iq - c) / tau_t)_k * log_softmax(s_v / tau_s)_k )

    where ``c`` is the centre. No gradient flows to the teacher. After the loss, the centre is moved towards
    the batch mean of the teacher output (averaged over ranks when a process group is running)::

        c <- m * c + (1 - m) * mean_batch(t)

    ``tau_t`` is warmed up linearly per epoch from ``warmup_teacher_temp`` (epoch 0) to ``teacher_temp``
    (epoch ``warmup_teacher_temp_epochs - 1``), then held, as in the reference. The centre is a buffer, so it is
    saved in ``state_dict`` and must be restored when resuming.

    Signatures of collapse in the returned metrics, with ``K = out_dim``:

    - uniform collapse (the teacher output no longer depends on the image, centring removes it): the loss
      sits at ``uniform_loss = ln K`` (8.3178 for K=4096, 11.0904 for K=65536), ``teacher_entropy`` tends to
      ``ln K`` and ``teacher_kl_uniform`` to 0;
    - one-hot collapse (one dimension dominates, sharpening wins over centring): ``teacher_entropy`` and the
      loss tend to 0 and ``teacher_kl_uniform`` to ``ln K``;
    - healthy training: ``teacher_entropy`` clearly between 0 and ``ln K`` and ``kl_teacher_student`` (the
      part of the loss the student can still reduce) decreasing without reaching 0.

    Args:
        out_dim: dimension ``K`` of the head output (number of prototypes).
        ncrops: number of student views, the 2 global ones included; >= 2.
        warmup_teacher_temp: teacher temperature at epoch 0.
        teacher_temp: teacher temperature after the warm-up; the reference advises at most 0.07.
        warmup_teacher_temp_epochs: epochs of the linear warm-up of the teacher temperature.
        nepochs: epochs of the run; the warm-up may not be longer.
        student_temp: student temperature.
        center_momentum: EMA momentum ``m`` of the centre, in [0, 1].
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        nepochs: int = 100,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        if ncrops < 2:
            raise ValueError(f"ncrops must be >= 2 (the 2 global views at least), got {ncrops}")
        for name, value in (
            ("warmup_teacher_temp", warmup_teacher_temp),
            ("teacher_temp", teacher_temp),
            ("student_temp", student_temp),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if nepochs < 1:
            raise ValueError(f"nepochs must be >= 1, got {nepochs}")
        if not 0 <= warmup_teacher_temp_epochs <= nepochs:
            raise ValueError(
                f"warmup_teacher_temp_epochs must be in [0, nepochs={nepochs}], got {warmup_teacher_temp_epochs}"
            )
        if not 0 <= center_momentum <= 1:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.warmup_teacher_temp = warmup_teacher_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.nepochs = nepochs
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        # The reference's linspace(warmup_teacher_temp, teacher_temp, W): teacher_temp W - 1 epochs in; with
        # W = 1, epoch 0 alone is at the warm-up value, which a one-epoch ramp gives too.
        self.temperature_schedule = CosineSchedule(
            peak=teacher_temp,
            end=teacher_temp,
            total_steps=nepochs,
            warmup_steps=max(warmup_teacher_temp_epochs - 1, 1) if warmup_teacher_temp_epochs else 0,
            start=warmup_teacher_temp,
        )
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temperature(self, epoch: int) -> float:
        """Teacher temperature at ``epoch`` (0-based); epochs past ``nepochs`` keep the final value."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return self.temperature_schedule(epoch)

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int, diagnostics: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Compute the loss, then update the centre.

        Args:
            student_output: student head outputs for all views, view-major, shape (ncrops * B, K); any dtype.
            teacher_output: teacher head outputs for the 2 global views, view-major, shape (2 * B, K).
            epoch: current epoch (0-based), which sets the teacher temperature.
            diagnostics: also compute the entropies below (four passes over the outputs; the training loop asks
                for them only at the iterations it logs).

        Returns:
            The scalar fp32 loss and a dict of diagnostics: ``teacher_temp`` and ``uniform_loss`` (``ln K``) as
            floats, and with ``diagnostics`` the detached fp32 scalars ``teacher_entropy``, ``student_entropy``
            (mean entropies in nats), ``teacher_kl_uniform`` (``ln K - teacher_entropy``) and
            ``kl_teacher_student`` (mean KL(teacher || student) over the pairs).
        """
        batch = teacher_output.shape[0] // 2
        if (
            student_output.ndim != 2
            or teacher_output.ndim != 2
            or student_output.shape[1] != self.out_dim
            or teacher_output.shape[1] != self.out_dim
            or batch == 0
            or teacher_output.shape[0] != 2 * batch
            or student_output.shape[0] != self.ncrops * batch
        ):
            raise ValueError(
                f"expected student_output ({self.ncrops} * B, {self.out_dim}) and teacher_output (2 * B, "
                f"{self.out_dim}), got {tuple(student_output.shape)} and {tuple(teacher_output.shape)}"
            )
        tau_t = self.teacher_temperature(epoch)
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            teacher = teacher_output.detach().float()
            student_log_prob = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
            teacher_logits = (teacher - self.center.float()) / tau_t
            teacher_prob = F.softmax(teacher_logits, dim=-1)

            # cross[i, v] = batch-mean cross-entropy between teacher view i and student view v.
            student_views = student_log_prob.view(self.ncrops, batch, self.out_dim)
            teacher_views = teacher_prob.view(2, batch, self.out_dim)
            cross = -torch.einsum("ibk,vbk->iv", teacher_views, student_views) / batch
            # The diagonal holds the pairs of a view with itself, which are left out.
            loss = (cross.sum() - cross.diagonal().sum()) / (2 * self.ncrops - 2)

            with torch.no_grad():
                uniform_loss = math.log(self.out_dim)
                metrics: dict[str, torch.Tensor | float] = {"teacher_temp": tau_t, "uniform_loss": uniform_loss}
                if diagnostics:
                    teacher_log_prob = F.log_softmax(teacher_logits, dim=-1)
                    teacher_entropy = -(teacher_prob * teacher_log_prob).sum(dim=-1).mean()
                    metrics |= {
                        "teacher_entropy": teacher_entropy,
                        "student_entropy": -(student_log_prob.exp() * student_log_prob).sum(dim=-1).mean(),
                        "teacher_kl_uniform": uniform_loss - teacher_entropy,
                        # Each teacher view occurs in the same number of pairs, so the pair mean of
                        # KL = CE - H(teacher) is the loss minus the mean teacher entropy.
                        "kl_teacher_student": (loss.detach() - teacher_entropy).clamp(min=0.0),
                    }
                self._update_center(teacher)
        return loss, metrics

    @torch.no_grad()
    def _update_center(self, teacher: torch.Tensor) -> None:
        # Every rank has the same batch size, so the mean of the per-rank means is the global batch mean.
        batch_center = all_reduce_mean(teacher.mean(dim=0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center.dtype), alpha=1 - self.center_momentum)
