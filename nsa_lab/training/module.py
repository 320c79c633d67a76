"""The LightningModule: next-token loss, AdamW, warmup + cosine, and what to log."""

from __future__ import annotations

import math
from collections.abc import Collection

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.distributed.fsdp import FullyShardedDataParallel

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


# What FSDP puts into the names of the parameters of every module it wraps.
FSDP_WRAPPED = "_fsdp_wrapped_module."


def matrix_names(model: torch.nn.Module) -> frozenset[str]:
    """Names of ``model``'s parameters with two or more dimensions (those that decay)."""
    return frozenset(name for name, p in model.named_parameters() if p.ndim >= 2)


def optimizer_groups(
    model: torch.nn.Module, weight_decay: float, matrices: Collection[str] | None = None
) -> list[dict]:
    """AdamW parameter groups: matrices decay, vectors (norm gains, biases) do not.

    ``matrices`` names the matrices (:func:`matrix_names` of the model before any
    wrapping); without it, the parameters' own shapes tell. FSDP needs the names: once it
    has wrapped a model, every parameter is a 1-D view of its shard, so by shape nothing
    would decay.
    """
    if matrices is None:
        pairs = [(p, p.ndim >= 2) for p in model.parameters()]
    else:
        pairs = [
            (p, name.replace(FSDP_WRAPPED, "") in matrices) for name, p in model.named_parameters()
        ]
    return [
        {"params": [p for p, decay in pairs if decay], "weight_decay": weight_decay},
        {"params": [p for p, decay in pairs if not decay], "weight_decay": 0.0},
    ]


def adamw(
    groups: list[dict], precision: str, **hyper: float | tuple[float, float]
) -> torch.optim.AdamW:
    """AdamW over ``groups``, fused (one kernel for every parameter) unless ``precision``
    (``train.precision``) is ``16-mixed``.

    The multi-tensor step costs the host several milliseconds per step in Python, which a
    host-bound step (NSA's many small launches) pays in full. A fused step unscales
    float16 gradients inside itself, so under a GradScaler nothing could clip them first:
    there it stays multi-tensor. Clipping a fused optimizer's gradients is
    :meth:`LanguageModel.configure_gradient_clipping`'s job.
    """
    return torch.optim.AdamW(groups, fused=precision != "16-mixed", **hyper)


def optimizer_state_by_model_position(
    state: dict, optimizer: torch.optim.Optimizer, model: torch.nn.Module
) -> dict:
    """``optimizer.state_dict()`` (``state``) re-keyed the way FSDP saves full optimizer
    states: a parameter's id is its position in ``model.parameters()``, each group's ids
    ascending.

    torch numbers a state dict's parameters group after group, so the ids of the two
    groups of :func:`optimizer_groups` interleave differently from the model's order;
    Lightning's FSDP strategy, loading a checkpoint that is not its own, assumes the
    model's order. Keyed this way, a checkpoint resumes under FSDP and (torch maps saved
    to current parameters by position within each group, and the groups keep the model's
    order) under every other strategy.
    """
    position = {id(p): i for i, p in enumerate(model.parameters())}
    in_groups = [p for group in optimizer.param_groups for p in group["params"]]
    to_model = {i: position[id(p)] for i, p in enumerate(in_groups)}
    return {
        "state": {to_model[i]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [to_model[i] for i in group["params"]]}
            for group in state["param_groups"]
        ],
    }


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
        self._matrices = matrix_names(self)  # before FSDP can flatten them
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

        Sequence-weighted means over all ranks (one all-gather of every rank's sums and
        count), so the last partial batch and uneven shards count exactly once per sequence;
        since every sequence has every position, the bucket means weighted by bucket size
        give ``val/loss``. Every rank logs the same global values (as numbers, so Lightning
        does not offer to reduce them again); rank 0's logger writes them.
        """
        count = torch.tensor([float(self._val_count)], device=self.device)
        totals = self.all_gather(torch.cat([self._val_sums, count]))
        if totals.ndim == 2:
            totals = totals.sum(0)
        means = (totals[:-1] / totals[-1].clamp_min(1)).tolist()
        self.log("val/loss", means[0], prog_bar=True)
        self.log("val/ppl", math.exp(means[0]))
        for bucket, value in zip(self._val_buckets, means[1:], strict=True):
            self.log(bucket.metric, value)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clips the gradients' global norm to ``train.grad_clip`` (Lightning's hook).

        Under FSDP every rank holds a shard of each gradient, so the norm must be reduced
        over ranks: the FSDP root's own ``clip_grad_norm_`` does that, where Lightning's
        precision plugin refuses norm clipping under FSDP. A fused AdamW (:func:`adamw`)
        Lightning refuses to clip at all, as it might hold scaled gradients; :func:`adamw`
        fuses only where none are scaled, so its gradients are clipped here as they are.
        Elsewhere Lightning's default.
        """
        model = self.trainer.model
        if isinstance(model, FullyShardedDataParallel):
            if gradient_clip_val:
                model.clip_grad_norm_(gradient_clip_val)
            return
        if optimizer.defaults.get("fused"):
            if gradient_clip_val:
                torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Optimizer states keyed as FSDP keys them (:func:`optimizer_state_by_model_position`),
        so that a checkpoint of any strategy and device count resumes under any other."""
        if "optimizer_states" not in checkpoint or isinstance(
            self.trainer.model, FullyShardedDataParallel
        ):
            return  # no optimizer saved, or Lightning's FSDP strategy already keyed them so
        checkpoint["optimizer_states"] = [
            optimizer_state_by_model_position(state, optimizer, self)
            for state, optimizer in zip(
                checkpoint["optimizer_states"], self.trainer.optimizers, strict=True
            )
        ]

    def configure_optimizers(self):
        t = self.cfg.train
        optimizer = adamw(
            optimizer_groups(self, t.weight_decay, self._matrices),
            t.precision,
            lr=t.lr,
            betas=(t.beta1, t.beta2),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
