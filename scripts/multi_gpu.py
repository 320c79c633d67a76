"""Multi-GPU measurements for docs/multi_gpu.md: DDP and FSDP on 1, 2 and 4 GPUs.

Every training is an ``nsa-lab train`` process writing to one MLflow store
(``WORK/mlflow.db``, experiment ``multi_gpu``); the figures are read back from it.

``scaling``: variants x strategies x GPU counts x models, each run the same number of
    optimizer steps at the same global batch (the per-device batch is global / k, so
    every run trains on the same examples step by step). Runs on disjoint GPUs go at
    the same time (``CUDA_VISIBLE_DEVICES``); a run starts only while the time budget
    leaves room for it. Then tokens/s (median of the logged windows after the first),
    the scaling efficiency (tokens/s on k GPUs / k x tokens/s on 1), the peak GPU memory
    (the largest rank's), the final validation loss (averaged over ranks) against one
    GPU, and the seed spread of the 1-GPU validation loss (``--seeds``).
``resume``: a 2-GPU FSDP checkpoint resumed on 1 GPU, and 1-GPU checkpoints resumed on
    2 GPUs (FSDP and DDP): one MLflow run each, FINISHED, logged at the steps of an
    uninterrupted run. Legs that ``--budget-s`` cannot hold are not started.
``kill``: SIGKILL one rank mid-run (``--ranks 1,0``: rank 1, then rank 0 of the resumed
    run): the seconds until every rank is gone and until the MLflow run is FAILED, then
    ``train.resume=true`` to the end.

Each writes ``OUT/multi_gpu_<command>.md`` and ``.json`` (``scaling`` also
``tokens_per_s.png``); logs go to ``WORK/logs``. On a 4-GPU machine, about 9, 3 and 3
minutes with ``--quick``::

    python scripts/multi_gpu.py scaling --work .mg_work --corpus python_source --out $OUT --quick
    python scripts/multi_gpu.py resume --work .mg_work --corpus python_source --out $OUT --quick
    python scripts/multi_gpu.py kill --work .mg_work --corpus python_source --out $OUT --quick

``--corpus`` is ``builtin``, ``python_source`` or a text file (or glob). A CPU dry run
(processes instead of GPUs, DDP only: Lightning runs FSDP on GPUs only)::

    python scripts/multi_gpu.py scaling --work /tmp/mg --corpus builtin --out /tmp/mg/out \\
        --accelerator cpu --gpus 2 --counts 1,2 --strategies ddp --models small --steps 6 \\
        --seeds 0,1 --set model.n_layers=1 data.seq_len=64 model.max_seq_len=64
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from nsa_lab.training.rank_watchdog import process_alive

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "multi_gpu"


@dataclass(frozen=True)
class Model:
    """A model to measure: a config, overrides on it, and its global batch (sequences)."""

    config: str
    overrides: tuple[str, ...]
    global_batch: int


FOUR_K = ("data.seq_len=4096", "model.max_seq_len=4096")
MODELS = {
    # experiments/default.yaml as it is: 4 layers, d_model 256, 256 tokens.
    "small": Model("experiments/default.yaml", (), 64),
    # The same model at 4096 tokens.
    "small-4k": Model("experiments/default.yaml", FOUR_K, 16),
    # experiments/long_context.yaml's model (6 layers, d_model 512, the paper's NSA
    # blocks) at 4096 tokens, without its curriculum and needles.
    "long-4k": Model(
        "experiments/long_context.yaml",
        (*FOUR_K, "data.curriculum_seq_len=0", "data.curriculum_steps=0", "data.needle_fraction=0"),
        16,
    ),
}


@dataclass(frozen=True)
class Job:
    """One training: ``gpus`` devices, ``strategy`` ddp, fsdp or auto (one plain device)."""

    model: str
    variant: str
    strategy: str
    gpus: int
    seed: int = 0
    steps: int = 100
    val_every: int = 0  # 0: once, at the last step
    resume: bool = False
    name: str = ""

    @property
    def run_name(self) -> str:
        return self.name or f"{self.model}-{self.variant}-{self.strategy}-{self.gpus}g-s{self.seed}"


@dataclass
class Result:
    """A job and what its MLflow run says."""

    job: Job
    exit_code: int | None = None  # None: not run (the budget ran out)
    seconds: float = 0.0
    run_id: str | None = None
    status: str | None = None
    tokens_per_s: float | None = None
    peak_mem_gib: float | None = None
    val_loss: float | None = None
    note: str = ""


@dataclass
class Settings:
    """What every training of one invocation shares."""

    work: Path
    corpus: str
    accelerator: str = "gpu"
    log_every: int = 10
    extra: tuple[str, ...] = ()
    session: str = field(default_factory=lambda: time.strftime("%m%d-%H%M%S"))

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.work.resolve() / 'mlflow.db'}"


def corpus_overrides(corpus: str) -> list[str]:
    if corpus in ("builtin", "python_source"):
        return [f"data.source={corpus}"]
    return ["data.source=text", f"data.path={corpus}"]


def train_command(job: Job, s: Settings) -> list[str]:
    """The ``nsa-lab train`` command line of ``job``."""
    model = MODELS[job.model]
    if model.global_batch % job.gpus:
        raise ValueError(f"{job.run_name}: global batch {model.global_batch} over {job.gpus}")
    return [
        sys.executable,
        "-m",
        "nsa_lab",
        "train",
        str(REPO / model.config),
        *model.overrides,
        *corpus_overrides(s.corpus),
        f"attn.name={job.variant}",
        f"train.strategy={job.strategy}",
        f"train.devices={job.gpus}",
        f"train.accelerator={s.accelerator}",
        f"data.batch_size={model.global_batch // job.gpus}",
        f"train.max_steps={job.steps}",
        f"train.val_every={job.val_every or job.steps}",
        f"train.log_every={min(s.log_every, job.steps)}",
        f"train.seed={job.seed}",
        f"train.resume={str(job.resume).lower()}",
        f"train.ckpt_dir={s.work.resolve() / 'ckpt'}",
        f"data.cache_dir={s.work.resolve() / 'token_cache'}",
        f"tracking.uri={s.uri}",
        f"tracking.experiment={EXPERIMENT}",
        f"tracking.run_name={job.run_name}",
        *s.extra,
    ]


class Handle(Protocol):
    def poll(self) -> int | None: ...

    def kill(self) -> None: ...


Launch = Callable[[Job, list[int]], Handle]


def launcher(s: Settings, port: Iterable[int], slots: int) -> Launch:
    """Starts ``job`` as a process on ``gpus`` of ``slots``, logging to
    ``WORK/logs/<run name>.log``."""
    ports = iter(port)
    (s.work / "logs").mkdir(parents=True, exist_ok=True)

    def launch(job: Job, gpus: list[int]) -> subprocess.Popen:
        env = {**os.environ, "MASTER_PORT": str(next(ports)), "PYTHONUNBUFFERED": "1"}
        # Every process an equal share of the CPU cores, however many run at once.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // slots)))
        if s.accelerator != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        log = open(s.work / "logs" / f"{job.run_name}.log", "a")  # noqa: SIM115 (the child's)
        return subprocess.Popen(
            train_command(job, s), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
        )

    return launch


def run_pool(
    jobs: Sequence[Job],
    slots: int,
    launch: Launch,
    deadline: float,
    job_reserve_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[Job, tuple[int | None, float]]:
    """Runs ``jobs`` on ``slots`` devices, each on ``job.gpus`` free ones, in order where
    they fit (a later, smaller job may fill devices a larger one waits for).

    A job starts only if it can end before ``deadline``: if as much time is left as the
    longest finished job of its model and GPU count took (``job_reserve_s`` before any
    did); one still running at the deadline is killed. Returns each job's exit code
    (None: never started) and seconds.
    """
    free = list(range(slots))
    pending = [j for j in jobs if j.gpus <= slots]
    running: list[tuple[Job, Handle, list[int], float]] = []
    done: dict[Job, tuple[int | None, float]] = {j: (None, 0.0) for j in jobs}
    took: dict[tuple[str, int], float] = {}
    while pending or running:
        for job in list(pending):
            now = clock()
            if deadline - now < took.get((job.model, job.gpus), job_reserve_s):
                pending.remove(job)  # it would not end in time
            elif job.gpus <= len(free):
                gpus, free = free[: job.gpus], free[job.gpus :]
                running.append((job, launch(job, gpus), gpus, now))
                pending.remove(job)
        for entry in list(running):
            job, handle, gpus, started = entry
            code = handle.poll()
            if code is None and clock() > deadline:
                handle.kill()
                code = -signal.SIGKILL
            if code is not None:
                running.remove(entry)
                free = sorted(free + gpus)
                seconds = clock() - started
                done[job] = (code, seconds)
                took[job.model, job.gpus] = max(seconds, took.get((job.model, job.gpus), 0.0))
        if running:
            sleep(0.5)
    return done


def scaling_jobs(
    models: Sequence[str],
    variants: Sequence[str],
    strategies: Sequence[str],
    counts: Sequence[int],
    seeds: Sequence[int],
    steps: int,
) -> list[Job]:
    """Row by row (model, then variant), so that a time budget that runs out drops whole
    rows, never a row's 1-GPU baseline; in a row, most GPUs first (they run alone, and the
    smaller runs then share the GPUs). The extra seeds (1-GPU DDP, for the noise) last. A
    strategy on one GPU is its own baseline."""
    jobs = [
        Job(model, variant, strategy, k, steps=steps)
        for model in models
        for variant in variants
        for k in sorted(counts, reverse=True)
        for strategy in strategies
    ]
    noise = [
        Job(model, variant, strategies[0], min(counts), seed=seed, steps=steps)
        for seed in seeds
        if seed != 0
        for model in models
        for variant in variants
    ]
    return jobs + noise


def read_run(client: Any, experiment_id: str, run_name: str) -> dict[str, Any]:
    """Status, run id, tokens/s, peak memory and final validation loss of a run."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`mlflow.runName` = '{run_name}'",
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        return {}
    run = runs[0]

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    windows = [v for _, v in history("train/tokens_per_s")]
    val = history("val/loss")
    return {
        "run_id": run.info.run_id,
        "status": run.info.status,
        # The first window pays for compilation and autotuning.
        "tokens_per_s": statistics.median(windows[1:] or windows) if windows else None,
        "peak_mem_gib": run.data.metrics.get("train/peak_mem_gib"),
        "val_loss": val[-1][1] if val else None,
    }


def collect(s: Settings, done: dict[Job, tuple[int | None, float]]) -> list[Result]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=s.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    results = []
    for job, (code, seconds) in done.items():
        result = Result(job, code, round(seconds, 1))
        if code is None:
            result.note = "not run (the time budget, or fewer GPUs than it needs)"
        elif experiment is not None:
            for key, value in read_run(client, experiment.experiment_id, job.run_name).items():
                setattr(result, key, value)
        if code not in (None, 0):
            result.note = last_error(s.work / "logs" / f"{job.run_name}.log")
        results.append(result)
    return results


def last_error(log: Path) -> str:
    """The last line of a log that names an error (or its last line)."""
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    errors = [x for x in lines if "Error" in x or "error:" in x]
    return (errors or lines or ["empty log"])[-1][:300]


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def scaling_tables(results: Sequence[Result], counts: Sequence[int]) -> str:
    """Per model: tokens/s, efficiency, peak memory and val loss by strategy and GPU count,
    and the seed spread of the 1-GPU validation loss."""
    by_key = {
        (r.job.model, r.job.variant, r.job.strategy, r.job.gpus, r.job.seed): r for r in results
    }
    out = []
    for model in dict.fromkeys(r.job.model for r in results):
        m = MODELS[model]
        out.append(
            f"### {model}: {m.config} {' '.join(m.overrides)} (global batch {m.global_batch})\n"
        )
        head = ["variant", "strategy"]
        head += [f"tokens/s {k} GPU" for k in counts]
        head += [f"efficiency {k}" for k in counts if k > 1]
        head += [f"peak GiB {k}" for k in counts]
        head += [f"val loss {k}" for k in counts]
        out.append("| " + " | ".join(head) + " |")
        out.append("|---" * len(head) + "|")
        combos = dict.fromkeys(
            (r.job.variant, r.job.strategy)
            for r in results
            if r.job.model == model and r.job.seed == 0
        )
        for variant, strategy in combos:
            cells = {k: by_key.get((model, variant, strategy, k, 0)) for k in counts}
            base = cells[min(counts)]
            row = [variant, strategy]
            row += [fmt(c and c.tokens_per_s, ",.0f") for c in cells.values()]
            for k in counts:
                if k > 1:
                    row.append(fmt(efficiency(base, cells[k], k // min(counts)), ".2f"))
            row += [fmt(c and c.peak_mem_gib, ".2f") for c in cells.values()]
            row += [fmt(c and c.val_loss, ".4f") for c in cells.values()]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
        out.extend(noise_lines(results, model, min(counts)))
        out.append("")
    return "\n".join(out)


def efficiency(base: Result | None, scaled: Result | None, factor: int) -> float | None:
    """tokens/s on k GPUs over ``factor`` times tokens/s on the baseline count."""
    if not (base and scaled and base.tokens_per_s and scaled.tokens_per_s):
        return None
    return scaled.tokens_per_s / (factor * base.tokens_per_s)


def noise_lines(results: Sequence[Result], model: str, base_gpus: int) -> list[str]:
    """Per variant: the 1-GPU validation losses over seeds (their spread is the seed noise)
    and the largest gap between a k-GPU run and the 1-GPU run of its strategy (seed 0)."""
    lines = []
    own_model = [r for r in results if r.job.model == model]
    for variant in dict.fromkeys(r.job.variant for r in own_model):
        own = [r for r in own_model if r.job.variant == variant and r.val_loss is not None]
        noisy = {r.job.strategy for r in own if r.job.seed != 0}
        seeds = sorted(
            (r.job.seed, r.val_loss)
            for r in own
            if r.job.gpus == base_gpus and r.job.strategy in noisy
        )
        base = {
            r.job.strategy: r.val_loss for r in own if r.job.gpus == base_gpus and r.job.seed == 0
        }
        gaps = [
            abs(r.val_loss - base[r.job.strategy])
            for r in own
            if r.job.seed == 0 and r.job.gpus != base_gpus and r.job.strategy in base
        ]
        losses = [v for _, v in seeds]
        spread = max(losses) - min(losses) if len(losses) > 1 else None
        lines.append(
            f"- {variant}: 1-GPU val loss over seeds {[s for s, _ in seeds]}: "
            f"{', '.join(f'{v:.4f}' for v in losses) or '-'} (spread {fmt(spread, '.4f')}); "
            f"largest |k-GPU - 1-GPU| (seed 0, same strategy): "
            f"{fmt(max(gaps) if gaps else None, '.4f')}"
        )
    return lines


def plot_scaling(results: Sequence[Result], counts: Sequence[int], path: Path) -> None:
    """tokens/s against GPU count, one panel per model, one line per variant and strategy
    (dotted: k times the 1-GPU figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.job.model for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        lines = dict.fromkeys(
            (r.job.variant, r.job.strategy) for r in results if r.job.model == model
        )
        for variant, strategy in lines:
            points = sorted(
                (r.job.gpus, r.tokens_per_s)
                for r in results
                if (r.job.model, r.job.variant, r.job.strategy, r.job.seed)
                == (model, variant, strategy, 0)
                and r.tokens_per_s
            )
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            (line,) = ax.plot(xs, ys, marker="o", label=f"{variant} {strategy}")
            ax.plot(xs, [ys[0] * x / xs[0] for x in xs], ":", color=line.get_color(), alpha=0.6)
        ax.set_title(model)
        ax.set_xlabel("GPUs")
        ax.set_xticks(list(counts))
        ax.set_ylabel("tokens/s (all GPUs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Training throughput against GPU count (dotted: linear scaling)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(s: Settings) -> str:
    """Date, commit, devices and versions, as a markdown list."""
    from importlib.metadata import version

    def run(*cmd: str) -> str:
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, cwd=REPO, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    gpus = run("nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader")
    names = sorted(set(gpus.splitlines()))
    return "\n".join(
        [
            f"- date: {time.strftime('%Y-%m-%d')}",
            f"- commit: {run('git', 'rev-parse', '--short', 'HEAD') or 'unknown'}"
            + (
                " (dirty tree)"
                if run("git", "status", "--porcelain", "--untracked-files=no")
                else ""
            ),
            f"- devices: {len(gpus.splitlines())} x {', '.join(names)}"
            if gpus
            else "- devices: no GPU",
            f"- torch {version('torch')}, lightning {version('lightning')}, "
            f"accelerator {s.accelerator}",
            f"- corpus: {s.corpus}; MLflow store {s.uri}, experiment {EXPERIMENT}",
        ]
    )


def write_outputs(out: Path, command: str, markdown: str, records: Any) -> None:
    (out / f"multi_gpu_{command}.md").write_text(markdown + "\n")
    (out / f"multi_gpu_{command}.json").write_text(
        json.dumps(records, indent=1, default=str) + "\n"
    )
    print(markdown)


def prepare(s: Settings, models: Iterable[str]) -> None:
    """Build the token caches before any timed run (``nsa-lab prepare`` per model)."""
    procs = []
    for model in models:
        m = MODELS[model]
        command = [
            sys.executable,
            "-m",
            "nsa_lab",
            "prepare",
            str(REPO / m.config),
            *m.overrides,
            *corpus_overrides(s.corpus),
            f"data.cache_dir={s.work.resolve() / 'token_cache'}",
            f"tracking.uri={s.uri}",
            *s.extra,
        ]
        procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, cwd=REPO))
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"nsa-lab prepare failed ({proc.args})")


def cmd_scaling(args: argparse.Namespace, s: Settings) -> int:
    started = time.monotonic()
    strategies = names(args.strategies)
    if args.accelerator == "cpu" and "fsdp" in strategies:
        print("FSDP needs GPUs (Lightning refuses it on a CPU): leaving it out", file=sys.stderr)
        strategies = [x for x in strategies if x != "fsdp"]
    counts = sorted(int(k) for k in names(args.counts))
    models = names(args.models)
    seeds = [int(x) for x in names(args.seeds)]
    jobs = scaling_jobs(models, names(args.variants), strategies, counts, seeds, args.steps)
    jobs = [replace(j, name=f"{j.run_name}-{s.session}") for j in jobs]
    prepare(s, models)
    done = run_pool(
        jobs,
        args.gpus,
        launcher(s, range(29500, 29900), args.gpus),
        started + args.budget_s,
        args.job_reserve_s,
    )
    results = collect(s, done)
    markdown = "\n\n".join(
        [
            f"## Scaling: {args.steps} steps per run, the same global batch on every GPU count",
            environment(s),
            scaling_tables(results, counts),
            failures(results),
        ]
    )
    plot_scaling(results, counts, Path(args.out) / f"tokens_per_s{args.label}.png")
    write_outputs(Path(args.out), f"scaling{args.label}", markdown, [asdict(r) for r in results])
    return 0 if all(r.exit_code == 0 for r in results) else 1


def failures(results: Sequence[Result]) -> str:
    bad = [f"- {r.job.run_name}: exit {r.exit_code}, {r.note}" for r in results if r.exit_code != 0]
    return "Runs that did not finish:\n\n" + "\n".join(bad) if bad else "Every run finished."


def expected_log_steps(steps: int, log_every: int) -> list[int]:
    """The MLflow steps of ``train/loss`` in an uninterrupted run of ``steps`` steps."""
    return list(range(log_every - 1, steps, log_every))


def resume_chains(accelerator: str, model: str, variant: str, first: int) -> dict[str, list[Job]]:
    """Named chains of trainings, each resuming the one before into the same run."""
    legs = {
        "fsdp-2to1": [(2, "fsdp"), (1, "auto")],
        "1to2-fsdp": [(1, "auto"), (2, "fsdp")],
        "1to2-ddp": [(1, "auto"), (2, "ddp")],
    }
    if accelerator == "cpu":  # no FSDP on a CPU
        legs = {"ddp-2to1": [(2, "ddp"), (1, "auto")], "1to2-ddp": legs["1to2-ddp"]}
    return {
        name: [
            Job(
                model,
                variant,
                strategy,
                gpus,
                steps=first * (i + 1),
                val_every=first,
                resume=i > 0,
                name=f"resume-{name}",
            )
            for i, (gpus, strategy) in enumerate(chain)
        ]
        for name, chain in legs.items()
    }


def cmd_resume(args: argparse.Namespace, s: Settings) -> int:
    """Each chain's legs in turn; a leg starts only with ``--job-reserve-s`` left of
    ``--budget-s``, so that the checks of the chains that ran are written even when the
    budget cannot hold them all (a leg not started counts as ``None``)."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.tracking import MlflowClient

    prepare(s, [args.model])
    chains = resume_chains(args.accelerator, args.model, args.variant, args.steps)
    chains = {k: [replace(j, name=f"{j.name}-{s.session}") for j in v] for k, v in chains.items()}
    launch = launcher(s, range(29900, 30000), args.gpus)
    groups = max(1, args.gpus // 2)
    deadline = time.monotonic() + args.budget_s

    def run_group(group: int) -> dict[str, list[int | None]]:
        codes: dict[str, list[int | None]] = {}
        gpus = [2 * group, 2 * group + 1]
        for i, (name, legs) in enumerate(chains.items()):
            if i % groups == group:
                codes[name] = []
                for leg in legs:
                    if codes[name] and codes[name][-1] != 0:
                        break
                    if deadline - time.monotonic() < args.job_reserve_s:
                        codes[name].append(None)  # the budget cannot hold this leg
                        break
                    codes[name].append(launch(leg, gpus[: leg.gpus]).wait())
        return codes

    with ThreadPoolExecutor(groups) as pool:
        codes = {k: v for part in pool.map(run_group, range(groups)) for k, v in part.items()}
    client = MlflowClient(tracking_uri=s.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    rows, records, ok = [], [], True
    for name, legs in chains.items():
        checks = resume_checks(client, experiment.experiment_id, legs, s.log_every, s.work)
        passed = codes.get(name) == [0] * len(legs) and all(checks.values())
        ok &= passed
        path = " -> ".join(f"{j.gpus} GPU {j.strategy} to step {j.steps}" for j in legs)
        if None in codes.get(name, [None]):
            verdict = "not run: the time budget ran out"
        elif passed:
            verdict = "pass"
        else:
            verdict = "FAIL: " + ", ".join(k for k, v in checks.items() if not v)
        rows.append(f"| {name} | {path} | {codes.get(name)} | {verdict} |")
        records.append(
            {
                "chain": name,
                "legs": [asdict(j) for j in legs],
                "exit": codes.get(name),
                "checks": checks,
            }
        )
    markdown = "\n".join(
        [
            "## Resume across GPU counts",
            "",
            environment(s),
            "",
            "| chain | legs | exit codes | checks |",
            "|---|---|---|---|",
            *rows,
            "",
            "Checks: one MLflow run, FINISHED; its train/loss steps are those of an uninterrupted "
            "run; validation at every leg's last step; the last checkpoint at the last step.",
        ]
    )
    write_outputs(Path(args.out), f"resume{args.label}", markdown, records)
    return 0 if ok else 1


def resume_checks(
    client: Any, experiment_id: str, legs: Sequence[Job], log_every: int, work: Path
) -> dict[str, bool]:
    last = legs[-1]
    runs = client.search_runs([experiment_id], f"tags.`mlflow.runName` = '{last.run_name}'")
    if len(runs) != 1:
        return {"one run": False}
    run_id = runs[0].info.run_id

    def steps(key: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, key))

    ckpt = work.resolve() / "ckpt" / last.run_name / "last.ckpt"
    return {
        "one run": True,
        "finished": runs[0].info.status == "FINISHED",
        "train/loss steps": steps("train/loss") == expected_log_steps(last.steps, log_every),
        "val/loss steps": steps("val/loss") == [leg.steps - 1 for leg in legs],
        "last.ckpt step": ckpt_step(ckpt) == last.steps,
    }


def ckpt_step(path: Path) -> int | None:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except (OSError, KeyError, RuntimeError):
        return None


def rank_pids(rank0: int) -> dict[int, int]:
    """``{rank: pid}`` of a run Lightning launched from ``rank0`` (its children, by the
    ``LOCAL_RANK`` they were started with; the rank watchdog is not one)."""
    ranks = {0: rank0}
    for child in Path(f"/proc/{rank0}/task/{rank0}/children").read_text().split():
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        local = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"LOCAL_RANK=")]
        if local and b"rank_watchdog" not in cmdline:
            ranks[int(local[0])] = int(child)
    return ranks


def wait_for(condition: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``condition`` holds (polled every 0.1 s), None after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.1)
    return round(time.monotonic() - start, 2)


def newest_ckpt(folder: Path) -> Path | None:
    found = [p for p in folder.glob("*.ckpt") if not p.name.startswith(".")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def kill_one(job: Job, victim: int, launch: Launch, gpus: list[int], s: Settings, wait_s: float):
    """Starts ``job``, SIGKILLs rank ``victim`` just after a new checkpoint, and times how
    long until every rank is gone and until the MLflow run is FAILED."""
    from mlflow.tracking import MlflowClient

    folder = s.work.resolve() / "ckpt" / job.run_name
    before = time.time()
    proc = launch(job, gpus)

    def saved() -> bool:
        newest = newest_ckpt(folder)
        return proc.poll() is not None or (newest is not None and newest.stat().st_mtime > before)

    if wait_for(saved, wait_s) is None or proc.poll() is not None:
        proc.kill()
        return {"victim": victim, "note": f"no checkpoint (exit {proc.poll()})"}
    time.sleep(2)  # mid-run: past the checkpoint
    ranks = rank_pids(proc.pid)
    os.kill(ranks[victim], signal.SIGKILL)
    gone = wait_for(lambda: not any(process_alive(p) for p in ranks.values()), wait_s)
    proc.poll()  # reap rank 0
    client = MlflowClient(tracking_uri=s.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    run_id = client.search_runs([experiment], f"tags.`mlflow.runName` = '{job.run_name}'")[0]
    run_id = run_id.info.run_id
    failed = wait_for(lambda: client.get_run(run_id).info.status == "FAILED", 120)
    for pid in ranks.values():  # whatever is left after the wait
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)
    return {
        "victim": victim,
        "ranks": ranks,
        "all_gone_s": gone,
        "failed_s": failed,
        "checkpoint_step": ckpt_step(newest_ckpt(folder) or folder),
        "run_id": run_id,
        "note": "",
    }


def cmd_kill(args: argparse.Namespace, s: Settings) -> int:
    from mlflow.tracking import MlflowClient

    prepare(s, [args.model])
    name = f"kill-{args.strategy}-{args.kill_gpus}g-{s.session}"
    launch = launcher(s, range(30000, 30100), args.gpus)
    gpus = list(range(args.kill_gpus))
    job = Job(
        args.model,
        args.variant,
        args.strategy,
        args.kill_gpus,
        steps=10**6,
        val_every=args.steps,
        name=name,
    )
    kills = []
    for i, victim in enumerate(int(x) for x in names(args.ranks)):
        kills.append(kill_one(replace(job, resume=i > 0), victim, launch, gpus, s, args.wait_s))
        if kills[-1]["note"]:
            break
    resumed: dict[str, Any] = {}
    if kills and kills[-1].get("checkpoint_step") is not None:
        target = kills[-1]["checkpoint_step"] + args.steps
        code = launch(replace(job, steps=target, resume=True), gpus).wait()
        run = MlflowClient(tracking_uri=s.uri).get_run(kills[-1]["run_id"])
        last = ckpt_step(s.work.resolve() / "ckpt" / name / "last.ckpt")
        resumed = {"exit": code, "status": run.info.status, "target_step": target, "last": last}
    ok = (
        bool(resumed)
        and resumed["status"] == "FINISHED"
        and resumed["last"] == resumed["target_step"]
    )
    rows = [
        f"| {k['victim']} | {fmt(k.get('all_gone_s'), '.1f')} | {fmt(k.get('failed_s'), '.1f')} "
        f"| {k.get('checkpoint_step', '-')} | {k['note']} |"
        for k in kills
    ]
    markdown = "\n".join(
        [
            f"## A rank SIGKILLed mid-run: {args.kill_gpus} GPUs, {args.strategy}, {args.variant}",
            "",
            environment(s),
            "",
            "| killed rank | s until all ranks gone | s until FAILED | checkpoint step | note |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Then `train.resume=true` to step {resumed.get('target_step', '-')}: "
            f"{resumed or 'not run'}",
        ]
    )
    write_outputs(
        Path(args.out), f"kill{args.label}", markdown, {"kills": kills, "resume": resumed}
    )
    return 0 if ok else 1


def names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["scaling", "resume", "kill"])
    parser.add_argument("--work", required=True, help="work folder (store, checkpoints, logs)")
    parser.add_argument("--corpus", required=True, help="builtin, python_source or a text file")
    parser.add_argument("--out", required=True, help="where the tables, JSON and plot go")
    parser.add_argument("--quick", action="store_true", help="fewer steps and seeds (~9 min)")
    parser.add_argument("--gpus", type=int, default=4, help="devices (processes on a CPU)")
    parser.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    parser.add_argument("--models", default="small,small-4k", help=f"of {list(MODELS)}")
    parser.add_argument("--model", default="small", help="resume and kill: the model")
    parser.add_argument("--variants", default="full,nsa")
    parser.add_argument("--variant", default="nsa", help="resume and kill: the variant")
    parser.add_argument("--strategies", default="ddp,fsdp")
    parser.add_argument("--counts", default="1,2,4")
    parser.add_argument("--seeds", default=None, help="1-GPU seeds for the noise (0,1,2)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--budget-s", type=float, default=540, help="scaling, resume: wall-clock limit"
    )
    parser.add_argument(
        "--job-reserve-s",
        type=float,
        default=60,
        help="scaling, resume: no run starts with less time left than this",
    )
    parser.add_argument("--strategy", default="ddp", help="kill: ddp or fsdp")
    parser.add_argument("--kill-gpus", type=int, default=2, help="kill: GPUs of the run")
    parser.add_argument("--ranks", default="1,0", help="kill: the ranks killed, in turn")
    parser.add_argument("--wait-s", type=float, default=180, help="kill: longest wait")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value for every run")
    parser.add_argument("--label", default="", help="suffix of the output files' names")
    args = parser.parse_args(argv)
    args.steps = args.steps or {"scaling": 100 if args.quick else 300}.get(args.command, 20)
    args.seeds = args.seeds or ("0,1" if args.quick else "0,1,2")
    settings = Settings(
        Path(args.work), args.corpus, args.accelerator, args.log_every, tuple(args.set)
    )
    settings.work.mkdir(parents=True, exist_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    command = {"scaling": cmd_scaling, "resume": cmd_resume, "kill": cmd_kill}[args.command]
    return command(args, settings)


if __name__ == "__main__":
    sys.exit(main())
