"""The ``nsa-lab`` command line.

Every subcommand that takes a config accepts YAML files and ``key=value``
overrides in any order (files merge first, left to right, then overrides).
Invalid input exits with code 2 before any work starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from nsa_lab.config import (
    COMPILE_MODES,
    ConfigError,
    load_config,
    parse_lengths,
    parse_names,
    to_yaml,
)

EXIT_USAGE = 2


def split_config_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate YAML paths from ``key=value`` overrides."""
    overrides = [a for a in args if "=" in a]
    files = [a for a in args if "=" not in a]
    return files, overrides


def _config_from(ns: argparse.Namespace):
    files, overrides = split_config_args(ns.args)
    return load_config(files, overrides)


def cmd_train(ns: argparse.Namespace) -> int:
    cfg = _config_from(ns)
    # heavy imports only when training
    from nsa_lab.evaluation.callback import needle_eval_callbacks
    from nsa_lab.training.run import train

    result = train(cfg, callbacks=needle_eval_callbacks(cfg))
    if result.run_id is None:  # a DDP worker: rank 0 reports
        return 0
    print(
        f"run {result.run_name} ({result.run_id}): step {result.global_step}, "
        f"val loss {result.val_loss:.4f}, checkpoint {result.checkpoint}"
    )
    return 0


def cmd_prepare(ns: argparse.Namespace) -> int:
    cfg = _config_from(ns)
    from nsa_lab.data import NSADataModule, cache_dir_for

    data = NSADataModule(
        cfg.data,
        cfg.train.seed,
        cache_dir=cache_dir_for(cfg.data, cfg.tracking.uri),
        needle_haystack=cfg.train.eval_needle,
    )
    data.setup()  # builds what is missing, then checks that the corpus packs into examples
    print(data.summary())
    return 0


def cmd_config(ns: argparse.Namespace) -> int:
    print(to_yaml(_config_from(ns)), end="")
    return 0


def cmd_variants(ns: argparse.Namespace) -> int:
    from nsa_lab.attention import list_variants

    variants = list_variants()
    width = max(len(v.name) for v in variants)
    for v in variants:
        print(f"{v.name:<{width}}  {v.description}")
    return 0


def cmd_ui(ns: argparse.Namespace) -> int:
    cfg = _config_from(ns)
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        cfg.tracking.uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(ns.port),
    ]
    print(f"MLflow UI for {cfg.tracking.uri} at http://127.0.0.1:{ns.port} (Ctrl-C stops it)")
    os.execv(sys.executable, argv)
    return 0  # not reached: execv replaces this process


def cmd_bench(ns: argparse.Namespace) -> int:
    lengths = parse_lengths(ns.lengths)
    if not lengths or min(lengths) < 1:
        raise ConfigError("--lengths", ns.lengths, "must be positive token counts")
    if ns.what == "kernels":
        from nsa_lab.benchmarks.kernels import run_kernel_bench

        report = run_kernel_bench(lengths)
    elif ns.what == "decode":
        report = _decode_bench(ns, lengths)
    else:
        report = _train_bench(ns, lengths)
    print(report)
    if ns.out:
        with open(ns.out, "w") as f:
            f.write(report + "\n")
    return 0


def _train_bench(ns: argparse.Namespace, lengths: list[int]) -> str:
    """``nsa-lab bench train``: its options checked (and the config it builds) before any run."""
    from nsa_lab.attention import list_variants
    from nsa_lab.benchmarks.training import bench_config, run_train_bench

    variants, known = parse_names(ns.variants), [v.name for v in list_variants()]
    if not variants or any(v not in known for v in variants):
        raise ConfigError("--variants", ns.variants, f"must name registered variants: {known}")
    batches = parse_lengths(ns.batch or "4", "--batch")
    if len(batches) != 1 or batches[0] < 1:
        raise ConfigError("--batch", ns.batch, "must be one count >= 1 for bench train")
    for option in ("steps", "warmup"):
        if getattr(ns, option) < 1:
            raise ConfigError(f"--{option}", getattr(ns, option), "must be >= 1")
    if ns.device.startswith("cuda") and not _cuda_available():
        raise ConfigError("--device", ns.device, "needs a CUDA GPU, and this machine has none")
    if ns.profile and not ns.device.startswith("cuda"):
        raise ConfigError("--profile", True, "profiles GPU kernels: needs --device cuda")
    for variant in variants:  # every row's config is valid before the first one runs
        bench_config(variant, max(lengths), ns.overrides)
    return run_train_bench(
        lengths,
        variants,
        batch=batches[0],
        steps=ns.steps,
        warmup=ns.warmup,
        compile_mode=ns.compile_mode or ("default" if ns.compile else None),
        overrides=ns.overrides,
        device=ns.device,
        profile=ns.profile,
    )


def _decode_bench(ns: argparse.Namespace, lengths: list[int]) -> str:
    """``nsa-lab bench decode``: its options checked before any run."""
    from nsa_lab.benchmarks.decode import WARM_STEPS, run_decode_bench

    batches = parse_lengths(ns.batch or "1,8", "--batch")
    if not batches or min(batches) < 1:
        raise ConfigError("--batch", ns.batch, "must be positive counts")
    if ns.steps < 1:
        raise ConfigError("--steps", ns.steps, "must be >= 1")
    if min(lengths) <= ns.steps + WARM_STEPS:
        rule = f"must exceed --steps={ns.steps} plus the {WARM_STEPS} untimed warm-up steps"
        raise ConfigError("--lengths", ns.lengths, rule)
    if ns.device.startswith("cuda") and not _cuda_available():
        raise ConfigError("--device", ns.device, "needs a CUDA GPU, and this machine has none")
    return run_decode_bench(lengths, batches, ns.steps, ns.device)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_sweep(ns: argparse.Namespace) -> int:
    from nsa_lab.sweeps.runner import run_sweep
    from nsa_lab.sweeps.spec import load_spec

    spec = load_spec(ns.spec, ns.overrides, ns.trials, ns.workers, ns.storage, ns.gpus)
    try:
        result = run_sweep(spec)
    except KeyboardInterrupt:
        print("nsa-lab: sweep interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    counts = result.counts
    print(
        f"sweep {result.study_name}: {counts['counted']} trials done, {counts['rejected']} "
        f"rejected, {counts['lost']} lost; best trial(s) {result.best_trials or '-'}; "
        f"parent run {result.parent_run_id}; storage {result.storage}"
    )
    return 1 if result.failed_workers else 0


def cmd_report(ns: argparse.Namespace) -> int:
    from nsa_lab.tracking.report import write_report

    cfg = _config_from(ns)
    if ns.step is not None and ns.step < 0:
        raise ConfigError("--step", ns.step, "must be >= 0 (an optimizer step)")
    print(write_report(ns.target, cfg.tracking.uri, ns.out, ns.step), end="")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    from nsa_lab.config import parse_depths
    from nsa_lab.evaluation.needle import evaluate_run

    options = {
        "lengths": parse_lengths(ns.lengths) if ns.lengths else None,
        "depths": parse_depths(ns.depths) if ns.depths else None,
        "trials": ns.trials,
        "seed": ns.seed,
        "tracking_uri": ns.tracking_uri,
        "device": ns.device,
    }
    if ns.what == "selection":
        from nsa_lab.evaluation.selection import (
            diagnose_run,
            selection_table,
            write_selection_table,
        )

        table = selection_table(diagnose_run(ns.run, **options), f"NSA selection of {ns.run}")
        print(table, end="")
        if ns.out:
            write_selection_table(table, ns.out)
        return 0
    from nsa_lab.evaluation.results import markdown_table

    results = evaluate_run(ns.run, out_dir=ns.out, **options)
    print(markdown_table(results, f"needle retrieval of {results.meta['variant']} ({ns.run})"))
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from nsa_lab.evaluation.generate import generate_run

    try:
        generate_run(
            ns.run,
            ns.max_new_tokens,
            prompt=ns.prompt,
            prompt_file=ns.prompt_file,
            temperature=ns.temperature,
            top_k=ns.top_k,
            seed=ns.seed,
            device=ns.device,
            tracking_uri=ns.tracking_uri,
        )
    except KeyboardInterrupt:
        print("\nnsa-lab: generation interrupted", file=sys.stderr)
        return 130
    return 0


CONFIG_ARGS_HELP = (
    "YAML config files and key=value overrides, e.g. experiments/smoke.yaml attn.l=32"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nsa-lab",
        description="Train and compare small language models with Native Sparse Attention.",
        epilog="example: nsa-lab train experiments/default.yaml attn.name=nsa_no_cmp",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        func: Callable[[argparse.Namespace], int],
        help: str,
        example: str,
        config: bool = True,
    ):
        p = sub.add_parser(name, help=help, description=help, epilog=f"example: {example}")
        if config:
            p.add_argument(
                "args", nargs="*", metavar="CONFIG.yaml|key=value", help=CONFIG_ARGS_HELP
            )
        # Where config arguments found among the options go (see parse_args).
        p.set_defaults(func=func, config_dest="args" if config else None)
        return p

    add(
        "train",
        cmd_train,
        "Train a model and log the run to MLflow.",
        "nsa-lab train experiments/smoke.yaml attn.name=full tracking.run_name=full-smoke",
    )
    add(
        "prepare",
        cmd_prepare,
        "Tokenise a config's corpus into the token cache (training the BPE first, if asked) "
        "and print its size, files and digest, so that later runs and processes reuse it.",
        "nsa-lab prepare experiments/default.yaml data.source=python_source",
    )
    add(
        "config",
        cmd_config,
        "Print the resolved config (defaults, files and overrides merged).",
        "nsa-lab config experiments/default.yaml attn.name=nsa_no_win",
    )
    add(
        "variants",
        cmd_variants,
        "List the registered attention variants.",
        "nsa-lab variants",
        config=False,
    )
    ui = add(
        "ui",
        cmd_ui,
        "Start the MLflow UI on 127.0.0.1 against the configured tracking store.",
        "nsa-lab ui tracking.uri=sqlite:///mlflow.db --port 5000",
    )
    ui.add_argument("--port", type=int, default=5000, help="port to listen on (default 5000)")
    bench = add(
        "bench",
        cmd_bench,
        "Time on a GPU. kernels: the Triton NSA kernels against dense SDPA, per stage, and "
        "a training step. train: end-to-end training steps per attention variant (tokens/s, "
        "MFU, peak memory, time to the first step), each in a fresh process; the model is "
        "the small research shape (6 layers, d_model 512, 8 heads in 2 groups of 64) unless "
        "--set changes it. decode: keys read per decoding step against the paper's Table 4, "
        "the NSA decode step against full attention's, and generation tokens/s.",
        "nsa-lab bench train --lengths 8k,16k --variants full,nsa,window --set model.n_layers=4",
        config=False,
    )
    bench.add_argument("what", choices=["kernels", "train", "decode"], help="what to benchmark")
    bench.add_argument("--lengths", default="8k,16k,32k,64k", help="sequence lengths")
    bench.add_argument("--out", help="also write the markdown report to this file")
    bench.add_argument(
        "--variants", default="full,nsa,window,nsa_shared_kv", help="train: attention variants"
    )
    bench.add_argument(
        "--batch", help="train: sequences per step (default 4); decode: batch sizes (1,8)"
    )
    bench.add_argument(
        "--steps", type=int, default=20, help="train: timed steps (median); decode: timed tokens"
    )
    bench.add_argument("--warmup", type=int, default=5, help="train: untimed steps first")
    bench.add_argument(
        "--compile", action="store_true", help="train: torch.compile the model (train.compile)"
    )
    bench.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        help="train: torch.compile's mode, implies --compile (train.compile_mode); "
        "reduce-overhead replays each step as CUDA graphs",
    )
    bench.add_argument("--device", default="cuda", help="train: cuda (default) or cpu")
    bench.add_argument(
        "--profile", action="store_true", help="train: also print each variant's GPU kernels"
    )
    bench.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="train: config overrides of the model (model.*, attn.*)",
    )
    evaluate = add(
        "eval",
        cmd_eval,
        "Evaluate a trained run. needle: needle-in-a-haystack retrieval accuracy per length "
        "and depth, logged into the run (metrics needle/acc..., heatmap) and printed. "
        "selection (NSA variants): per needle cell, whether each layer's selection holds the "
        "needle and the accuracy when it is made to (oracle); printed.",
        "nsa-lab eval needle 3f2a...c9 --lengths 256,512,1024 --depths 0,0.5,1 --trials 20",
        config=False,
    )
    evaluate.add_argument("what", choices=["needle", "selection"], help="which evaluation")
    evaluate.add_argument("run", metavar="RUN", help="MLflow run id or checkpoint path")
    evaluate.add_argument(
        "--lengths", help="context lengths in tokens (default: 1/4, 1/2, 1 x trained length)"
    )
    evaluate.add_argument("--depths", help="needle depths, fractions (default: 0,0.1,...,1)")
    evaluate.add_argument("--trials", type=int, help="needles per cell (default 20)")
    evaluate.add_argument("--seed", type=int, default=0, help="picks the needles (default 0)")
    evaluate.add_argument(
        "--tracking-uri", help="store of the run (default: the run's own, or sqlite:///mlflow.db)"
    )
    evaluate.add_argument(
        "--out",
        help="also write into this folder: the JSON, CSV and heatmap (needle), "
        "needle_selection.md (selection)",
    )
    evaluate.add_argument("--device", default="auto", help="auto (GPU if any), cpu or cuda")
    generate = add(
        "generate",
        cmd_generate,
        "Continue a prompt with a trained run, streaming the new text (not the prompt) to "
        "stdout as the tokens come, then a newline. KV-cached decoding, greedy unless "
        "--temperature > 0; stops early where the model ends the document. Prompt and new "
        "tokens must fit model.max_seq_len.",
        "nsa-lab generate 3f2a...c9 --prompt 'import ' --max-new-tokens 200",
        config=False,
    )
    generate.add_argument("run", metavar="RUN", help="MLflow run id or checkpoint path")
    generate.add_argument("--prompt", metavar="TEXT", help="the text to continue")
    generate.add_argument(
        "--prompt-file", metavar="F", help="continue this file's bytes instead (as they are)"
    )
    generate.add_argument(
        "--max-new-tokens",
        type=int,
        required=True,
        metavar="N",
        help="tokens to generate (fewer if the model ends the document first)",
    )
    generate.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature (default 0: greedy, the most likely token each step)",
    )
    generate.add_argument(
        "--top-k",
        type=int,
        metavar="K",
        help="when sampling, draw from the K most likely tokens only (default: all)",
    )
    generate.add_argument("--seed", type=int, default=0, help="seeds the sampling (default 0)")
    generate.add_argument("--device", default="auto", help="auto (GPU if any), cpu or cuda")
    generate.add_argument(
        "--tracking-uri", help="store of the run (default: the run's own, or sqlite:///mlflow.db)"
    )
    sweep = add(
        "sweep",
        cmd_sweep,
        "Run or resume an Optuna sweep from a spec; every trial is a child MLflow run.",
        "nsa-lab sweep sweeps/ablations.yaml --workers 2",
        config=False,
    )
    sweep.add_argument("spec", metavar="SPEC.yaml", help="sweep spec (see sweeps/)")
    sweep.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides for every trial"
    )
    sweep.set_defaults(config_dest="overrides")
    sweep.add_argument(
        "--trials", type=int, help="total trials the study should hold (default: the spec's)"
    )
    sweep.add_argument(
        "--workers", type=int, help="worker processes on this machine (with --gpus: per GPU)"
    )
    sweep.add_argument(
        "--gpus",
        metavar="0,1,2,3",
        help="GPU indices: one worker per GPU (or --workers per GPU), each pinned to its "
        "GPU through CUDA_VISIBLE_DEVICES; the spec's workers field then does not apply",
    )
    sweep.add_argument("--storage", help="Optuna RDB URL (default: optuna.db beside mlflow.db)")
    report = add(
        "report",
        cmd_report,
        "Compare runs: a table (val loss, needle accuracy, tokens/s, MFU, peak memory, "
        "parameters, attended tokens), loss by position, and overlaid curves, printed and "
        "logged to MLflow.",
        "nsa-lab report ablations tracking.uri=sqlite:///mlflow.db --out report/",
        config=False,
    )
    report.add_argument("target", metavar="EXPERIMENT|PARENT_RUN_ID", help="what to compare")
    report.set_defaults(config_dest="args")
    report.add_argument(
        "args",
        nargs="*",
        metavar="CONFIG.yaml|key=value",
        help="where the runs are logged, e.g. tracking.uri=sqlite:///mlflow.db",
    )
    report.add_argument("--out", help="also write report.md and the plot into this folder")
    report.add_argument(
        "--step",
        type=int,
        help="compare at equal steps: each run's last validation at or before step N "
        "(runs cut before their end included)",
    )
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Options and positional config arguments in any order.

    argparse stops filling a subcommand's ``nargs="*"`` positional at its first option
    (``sweep SPEC --trials 4 a=b`` would call ``a=b`` unrecognized), and its intermixed
    parsing does not work with subparsers; so what is left over joins the command's
    config arguments (``key=value`` overrides, or for commands that take them, YAML
    files), and anything else, an unknown option say, is an error.
    """
    ns, leftover = parser.parse_known_args(argv)
    dest = getattr(ns, "config_dest", None)
    takes_files = dest == "args"
    for item in leftover:
        if dest is None or item.startswith("-") or not ("=" in item or takes_files):
            parser.error(f"unrecognized arguments: {' '.join(leftover)}")
        getattr(ns, dest).append(item)
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parse_args(parser, argv)
    try:
        return ns.func(ns)
    except ConfigError as exc:
        print(f"nsa-lab: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
