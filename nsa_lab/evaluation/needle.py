"""Needle-in-a-haystack evaluation: the grid, greedy answers, exact-match scoring.

For every (context length, depth) cell, ``trials`` evaluation needles (see
:mod:`nsa_lab.data.needle` for the format) are hidden in held-out corpus text
(the validation split, which training never sees), the model answers greedily,
and an answer counts only if it is exactly the value followed by the full stop.
A cell's trials run in batches of about ``TOKENS_PER_BATCH`` tokens, decoded through
the model's KV caches: the prompts run through the model once (only the last
position's logits are computed, since those of every position grow with the
vocabulary), then each of the seven answer tokens is one cached step.

:func:`evaluate_run` (the ``nsa-lab eval needle`` command) and the training
callback both go through :func:`run_needle_eval`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from nsa_lab.config import ConfigError, sqlite_path
from nsa_lab.data import NSADataModule, cache_dir_for
from nsa_lab.data.needle import (
    ANSWER_TOKENS,
    EVAL_STREAM,
    OVERHEAD_TOKENS,
    NeedleFact,
    build_sample,
    haystack_tokens_needed,
    random_fact,
    stream_rng,
)
from nsa_lab.data.tokenizer import ByteTokenizer
from nsa_lab.evaluation.loading import LoadedRun, load_run
from nsa_lab.evaluation.results import CellResult, NeedleResults, log_results, write_results

DEFAULT_DEPTHS = tuple(i / 10 for i in range(11))
DEFAULT_TRIALS = 20
# A default length leaves at least as much haystack as needle, question and answer take.
MIN_DEFAULT_LENGTH = 2 * OVERHEAD_TOKENS
# Trials per batch are capped so that a batch holds about this many tokens.
TOKENS_PER_BATCH = 1 << 16
_TOKENIZER = ByteTokenizer()


@dataclass(frozen=True)
class NeedleGrid:
    """Which cells to evaluate and how many needles per cell; ``seed`` picks the needles."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    trials: int
    seed: int = 0


def default_lengths(trained_len: int) -> tuple[int, ...]:
    """A quarter, half and all of the trained context, dropping those too short for a needle."""
    candidates = (trained_len // 4, trained_len // 2, trained_len)
    lengths = tuple(n for n in candidates if n >= MIN_DEFAULT_LENGTH)
    return lengths or (trained_len,)


def make_grid(
    trained_len: int,
    max_len: int,
    lengths: Sequence[int] | None = None,
    depths: Sequence[float] | None = None,
    trials: int | None = None,
    seed: int = 0,
) -> NeedleGrid:
    """The grid to evaluate, defaults filled from the trained length, every value checked.

    A context may not exceed ``max_len`` (``model.max_seq_len``): the model refuses
    longer inputs, so extrapolation beyond the trained positions is not offered.
    """
    grid = NeedleGrid(
        lengths=tuple(sorted(set(lengths or default_lengths(trained_len)))),
        depths=tuple(sorted(set(DEFAULT_DEPTHS if depths is None else depths))),
        trials=DEFAULT_TRIALS if trials is None else trials,
        seed=seed,
    )
    for n in grid.lengths:
        if n <= OVERHEAD_TOKENS:
            raise ConfigError(
                "--lengths", n, f"must exceed {OVERHEAD_TOKENS} (needle + question + answer)"
            )
        if n > max_len:
            raise ConfigError(
                "--lengths", n, f"must be <= model.max_seq_len={max_len} of the evaluated model"
            )
    if not grid.depths or any(not 0.0 <= d <= 1.0 for d in grid.depths):
        raise ConfigError("--depths", list(grid.depths), "must be fractions in [0, 1]")
    if grid.trials < 1:
        raise ConfigError("--trials", grid.trials, "must be >= 1")
    return grid


def cell_needles(
    haystack: np.ndarray, length: int, depth: float, trials: int, seed: int
) -> tuple[np.ndarray, list[NeedleFact]]:
    """Prompts ``[trials, length - ANSWER_TOKENS]`` and their facts, for one cell.

    Each trial takes a random stretch of ``haystack`` and an evaluation needle from
    the evaluation stream, seeded by ``(seed, length, depth)`` so that a cell's needles
    do not depend on which other cells are evaluated.
    """
    h = haystack_tokens_needed(length)
    if len(haystack) < h:
        raise ConfigError(
            "--lengths",
            length,
            f"needs {h} tokens of held-out haystack text, the validation split has "
            f"{len(haystack)}; evaluate shorter contexts or give the run a larger data.val_path",
        )
    rng = stream_rng(EVAL_STREAM, seed, length, round(depth * 1_000_000))
    prompts, facts = [], []
    for _ in range(trials):
        start = int(rng.integers(0, len(haystack) - h + 1))
        fact = random_fact(rng, "eval")
        prompts.append(build_sample(haystack[start : start + h], fact, depth, length).prompt)
        facts.append(fact)
    return np.stack(prompts), facts


def greedy_answers(model: nn.Module, prompts: np.ndarray, device: torch.device) -> torch.Tensor:
    """The greedy answers ``[rows, ANSWER_TOKENS]`` (on the CPU) to needle ``prompts``,
    :func:`rows_per_batch` prompts per batch.

    Each batch is decoded through the KV caches (``model.generate``): its prompts run
    through the model once, then every answer token is one cached step.
    """
    rows = rows_per_batch(prompts.shape[1] + ANSWER_TOKENS)
    answers = []
    for chunk in torch.split(torch.from_numpy(prompts), rows):
        with eval_autocast(device):
            steps = model.generate(chunk.to(device), ANSWER_TOKENS)
            answers.append(torch.stack(list(steps), dim=1).cpu())
    return torch.cat(answers)


def exact_match(generated: str, fact: NeedleFact) -> bool:
    """Right only if the generation is the value followed by the answer's full stop."""
    return generated == fact.answer


def evaluate_model(
    model: nn.Module, haystack: np.ndarray, grid: NeedleGrid, device: torch.device
) -> list[CellResult]:
    """Exact-match counts for every cell of ``grid``; the model is used as it is (eval mode)."""
    cells = []
    for length in grid.lengths:
        for depth in grid.depths:
            prompts, facts = cell_needles(haystack, length, depth, grid.trials, grid.seed)
            answers = greedy_answers(model, prompts, device)
            texts = [_TOKENIZER.decode(row) for row in answers.tolist()]
            correct = sum(map(exact_match, texts, facts))
            cells.append(CellResult(length, depth, grid.trials, correct))
    return cells


def rows_per_batch(length: int) -> int:
    """Prompts of ``length`` tokens per batch: ``TOKENS_PER_BATCH`` tokens, at least one."""
    return max(1, TOKENS_PER_BATCH // length)


def eval_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 on a GPU (as in training), nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_needle_eval(
    model: nn.Module,
    haystack: np.ndarray,
    grid: NeedleGrid,
    device: torch.device,
    meta: dict,
    client: MlflowClient | None = None,
    run_id: str | None = None,
    step: int = 0,
    out_dir: str | Path | None = None,
) -> NeedleResults:
    """Evaluate, then log to ``run_id`` (metrics at ``step``, artifacts) and/or write files.

    ``model`` is put in eval mode for the evaluation and returned to its former mode.
    """
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        cells = evaluate_model(model, haystack, grid, device)
    finally:
        model.train(was_training)
    meta = {
        **meta,
        **asdict(grid),
        "run_id": run_id,
        "step": step,
        "device": str(device),
        "seconds": round(time.perf_counter() - started, 2),
    }
    results = NeedleResults(cells, meta)
    title = f"{meta.get('variant', '')} needle retrieval, {100 * results.acc:.1f}% overall"
    if client is not None and run_id is not None:
        log_results(client, run_id, results, step, title.strip())
    if out_dir is not None:
        write_results(results, out_dir, title.strip())
    return results


def evaluate_run(
    ref: str,
    lengths: Sequence[int] | None = None,
    depths: Sequence[float] | None = None,
    trials: int | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
) -> NeedleResults:
    """Evaluate the checkpoint or MLflow run ``ref`` and log the results into that run.

    Grid and haystack as :func:`needle_setup` gives them. When the checkpoint names
    no run that the tracking store holds, results are only returned and written to
    ``out_dir``.
    """
    torch_device = eval_device(device)
    loaded, grid, haystack = needle_setup(ref, lengths, depths, trials, seed, tracking_uri)
    cfg = loaded.cfg
    client, run_id = _reachable_run(loaded.tracking_uri, loaded.run_id)
    meta = {
        "variant": cfg.attn.name,
        "checkpoint": str(loaded.checkpoint.resolve()),
        "trained_length": cfg.data.seq_len,
    }
    return run_needle_eval(
        loaded.module.model.to(torch_device),
        haystack,
        grid,
        torch_device,
        meta,
        client=client,
        run_id=run_id,
        step=loaded.global_step,
        out_dir=out_dir,
    )


def needle_setup(
    ref: str,
    lengths: Sequence[int] | None,
    depths: Sequence[float] | None,
    trials: int | None,
    seed: int,
    tracking_uri: str | None = None,
) -> tuple[LoadedRun, NeedleGrid, np.ndarray]:
    """What every evaluation of ``ref`` starts from: the run, its checked grid, its haystack.

    The haystack is the validation split of the run's own corpus; grid defaults come
    from the run's trained length (``data.seq_len``).
    """
    loaded = load_run(ref, tracking_uri)
    cfg = loaded.cfg
    grid = make_grid(cfg.data.seq_len, cfg.model.max_seq_len, lengths, depths, trials, seed)
    cache_dir = cache_dir_for(cfg.data, cfg.tracking.uri)
    data = NSADataModule(cfg.data, cfg.train.seed, cache_dir=cache_dir, needle_haystack=True)
    data.setup("validate")
    return loaded, grid, data.val_set.tokens


def eval_device(name: str) -> torch.device:
    """The ``--device`` option (auto: the GPU if any), checked before any work."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError("--device", name, "must be auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", name, "no CUDA GPU is available here")
    return torch.device(name)


def _reachable_run(uri: str, run_id: str | None) -> tuple[MlflowClient | None, str | None]:
    """A client for ``run_id`` in ``uri``, or ``(None, None)`` with a note if it is not there.

    A SQLite store that does not exist is not looked into, since opening it would create it.
    """
    reason = None
    if run_id is None:
        reason = "the checkpoint names no MLflow run"
    elif (db := sqlite_path(uri)) is not None and not db.is_file():
        reason = f"the tracking store {uri} does not exist"
    else:
        client = MlflowClient(tracking_uri=uri)
        try:
            client.get_run(run_id)
            return client, run_id
        except Exception:  # MlflowException, or a store that cannot be opened
            reason = f"run {run_id} is not in {uri}"
    print(f"nsa-lab: note: {reason}; results are not logged to MLflow", file=sys.stderr)
    return None, None
