"""The LightningModule: next-token loss, AdamW, warmup + cosine, and what to log."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from nsa_lab.data.needle import answer_mask
from nsa_lab.models.transformer import GQATransformer
from nsa_lab.tracking.loss_by_position import bucket_means, position_buckets
from nsa_lab.training.callbacks import writes_logs


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return token_losses(logits, targets).mean()


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position, ``[B, T]``, in float32."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), reduction="none"
    ).view_as(targets)


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: matrices decay, vectors (norm gains, biases) do not."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


class StepLossMean:
    """The mean loss of one optimizer step's micro-batches (``train.accumulate`` of them).

    Lightning scales each micro-batch's loss by ``1/accumulate`` before backward, so this
    mean is the loss the step descends; it is what ``train/loss`` shows, also for
    ``accumulate = 1`` (one micro-batch).
    """

    def __init__(self) -> None:
        self._step = -1
        self._sum = torch.zeros(())
        self._count = 0

    def add(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Adds a micro-batch of optimizer step ``step``; returns the step's mean so far."""
        if step != self._step:
            self._step, self._sum, self._count = step, torch.zeros((), device=loss.device), 0
        self._sum = self._sum + loss.detach()
        self._count += 1
        return self._sum / self._count


class LanguageModel(L.LightningModule):
    """Trains :class:`GQATransformer` on packed ``(inputs, targets)`` batches.

    The resolved config travels in the checkpoint's hyper-parameters, so a
    checkpoint alone rebuilds the model (evaluation, resume).
    """

    def __init__(self, config: dict, vocab_size: int) -> None:
        super().__init__()
        # logger=False: the tracking layer logs the config as flat "attn.l" params.
        self.save_hyperparameters(logger=False)
        self.cfg: DictConfig = OmegaConf.create(config)
        self.model = GQATransformer(self.cfg.model, self.cfg.attn, vocab_size)
        self._step_loss = StepLossMean()
        self._val_buckets = position_buckets(self.cfg.data.seq_len)
        self._val_sums = torch.zeros(1 + len(self._val_buckets))
        self._val_count = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        # The curriculum serves [B, rows, short_len] examples: rows join the batch.
        inputs, targets = (t.flatten(0, -2) for t in batch)
        logits = self.model(inputs)
        losses = token_losses(logits, targets)
        loss = losses.mean()
        self.log("train/loss", self._step_loss.add(self.global_step, loss), prog_bar=True)
        if self._is_log_step():
            self.log("train/seq_len", float(inputs.shape[1]))
            for key, value in self.model.gate_means().items():
                self.log(f"gates/{key}", value)
            if self.cfg.data.needle_fraction > 0:
                self._log_answer_metrics(inputs, targets, logits, losses)
        return loss

    def _is_log_step(self) -> bool:
        """Whether this step's logged values reach the logger (``global_step`` counts the
        steps taken before this one)."""
        return writes_logs(self.global_step + 1, self.cfg.train.log_every)

    def _log_answer_metrics(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        logits: torch.Tensor,
        losses: torch.Tensor,
    ) -> None:
        """Loss and teacher-forced accuracy on the needle answers of this batch.

        Retrieval is a small share of the tokens, so ``train/loss`` cannot show whether
        it is being learnt; ``train/answer_loss`` can: it sits at chance (6/7 ln 10 =
        1.97 for six random digits and a predictable full stop) until it is.
        """
        mask = answer_mask(inputs)
        if mask.any():
            self.log("train/answer_loss", losses[mask].mean())
            hits = logits.argmax(-1)[mask] == targets[mask]
            self.log("train/answer_acc", hits.float().mean())

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(1 + len(self._val_buckets), device=self.device)
        self._val_count = 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Adds this batch's mean loss, whole and per position bucket, once per sequence.

        Validation windows are ``data.seq_len`` long, so the buckets cover every position.
        """
        inputs, targets = batch
        losses = token_losses(self.model(inputs), targets)
        means = torch.cat([losses.mean()[None], bucket_means(losses, self._val_buckets)])
        self._val_sums += means.detach() * inputs.shape[0]
        self._val_count += inputs.shape[0]

    def on_validation_epoch_end(self) -> None:
        """Logs ``val/loss``, ``val/ppl`` and ``val/loss_pos/<bucket>`` for every bucket.

        Sequence-weighted means over all ranks (one all-gather), so the last partial
        batch and uneven shards count exactly once per sequence; since every sequence
        has every position, the bucket means weighted by bucket size give ``val/loss``.
        """
        count = torch.tensor([float(self._val_count)], device=self.device)
        totals = self.all_gather(torch.cat([self._val_sums, count]))
        if totals.ndim == 2:
            totals = totals.sum(0)
        means = totals[:-1] / totals[-1].clamp_min(1)
        self.log("val/loss", means[0], prog_bar=True, rank_zero_only=True)
        self.log("val/ppl", torch.exp(means[0]), rank_zero_only=True)
        for bucket, value in zip(self._val_buckets, means[1:], strict=True):
            self.log(bucket.metric, value, rank_zero_only=True)

    def configure_optimizers(self):
        t = self.cfg.train
        optimizer = torch.optim.AdamW(
            optimizer_groups(self, t.weight_decay),
            lr=t.lr,
            betas=(t.beta1, t.beta2),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
