"""``train.eval_needle=true``: the needle evaluation at the end of training, logged into the run."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig

from nsa_lab.evaluation.needle import make_grid, run_needle_eval


def needle_eval_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The callbacks ``train(cfg, callbacks=...)`` needs for ``train.eval_needle``: none
    when it is off."""
    if not cfg.train.eval_needle:
        return []
    return [NeedleEvalCallback()]


class NeedleEvalCallback(L.Callback):
    """Evaluates the trained model on the default needle grid when training ends.

    The grid is derived from the trained length (see :func:`make_grid`), the
    haystack is the data module's validation text, and results go into the run
    being trained (metrics at the final step, artifacts under ``needle/``). Only
    global rank 0 evaluates; the other ranks have nothing to log. Under FSDP no
    rank holds all the weights, so the config refuses the pair (``train.eval_needle``).
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        cfg = pl_module.cfg
        grid = make_grid(cfg.data.seq_len, cfg.model.max_seq_len)
        logger = next(lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger))
        results = run_needle_eval(
            pl_module.model,
            trainer.datamodule.val_set.tokens,
            grid,
            pl_module.device,
            {"variant": cfg.attn.name, "trained_length": cfg.data.seq_len},
            client=logger.experiment,
            run_id=logger.run_id,
            step=trainer.global_step,
        )
        print(f"needle retrieval: {100 * results.acc:.1f}% (metric needle/acc)")
