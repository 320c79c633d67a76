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

from nsa_lab.config import ConfigError, load_config, to_yaml

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
    from nsa_lab.training.run import train  # heavy imports only when training

    result = train(cfg)
    if result.run_id is None:  # a DDP worker: rank 0 reports
        return 0
    print(
        f"run {result.run_name} ({result.run_id}): step {result.global_step}, "
        f"val loss {result.val_loss:.4f}, checkpoint {result.checkpoint}"
    )
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
    from nsa_lab.benchmarks import parse_lengths, run_kernel_bench

    report = run_kernel_bench(parse_lengths(ns.lengths))
    print(report)
    if ns.out:
        with open(ns.out, "w") as f:
            f.write(report + "\n")
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
        p.set_defaults(func=func)
        return p

    add(
        "train",
        cmd_train,
        "Train a model and log the run to MLflow.",
        "nsa-lab train experiments/smoke.yaml attn.name=full tracking.run_name=full-smoke",
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
        "Time the Triton NSA kernels against dense SDPA, and training steps (needs a GPU).",
        "nsa-lab bench kernels --lengths 8k,16k,32k,64k --out bench.md",
        config=False,
    )
    bench.add_argument("what", choices=["kernels"], help="what to benchmark")
    bench.add_argument("--lengths", default="8k,16k,32k,64k", help="sequence lengths")
    bench.add_argument("--out", help="also write the markdown report to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return ns.func(ns)
    except ConfigError as exc:
        print(f"nsa-lab: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
