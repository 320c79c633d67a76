"""Typed experiment configuration.

The schema is a tree of dataclasses; OmegaConf merges, in order, the schema's
defaults, any YAML files and any ``key=value`` overrides, and rejects unknown
keys and ill-typed values. :func:`validate` then checks the rules that types
cannot express (the NSA block arithmetic of ``docs/nsa.md``, GQA divisibility,
branch names). Every failure raises :class:`ConfigError`, whose message names the
key, the value and the rule, so that the CLI can exit with code 2 before any
work starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# ConfigError lives in nsa_lab.errors and BRANCHES in the kernels' spec; both are
# importable from here too.
from nsa_lab.errors import ConfigError
from nsa_lab.kernels.nsa.spec import BRANCHES

IMPLS = ("auto", "torch", "triton")
STRATEGIES = ("auto", "ddp", "fsdp")
# torch.compile's modes (Inductor): reduce-overhead replays each step as CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Lightning's built-in accelerators this project can run on ("gpu" is Lightning's alias
# for cuda); TPUs (XLA) are left out: the attention kernels are PyTorch and Triton.
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# MLflow tracking stores that make sense here: a SQLite file, a local folder (file: URI or
# plain path), a tracking server, Databricks, or another database MLflow's SQL store takes.
TRACKING_SCHEMES = (
    "sqlite",
    "file",
    "http",
    "https",
    "databricks",
    "postgresql",
    "mysql",
    "mssql",
)
# Lightning's seed_everything takes a uint32.
MAX_SEED = 2**32 - 1
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
DATA_SOURCES = ("builtin", "python_source", "text", "json", "parquet", "hub")
TOKENIZERS = ("byte", "bpe")
# A byte-level BPE starts from the 256 bytes and the end-of-document id: a vocabulary
# must have room for at least one merge beyond them.
MIN_BPE_VOCAB = 258


@dataclass
class ModelConfig:
    """Decoder-only GQA transformer (RMSNorm pre-norm, RoPE, SwiGLU, tied embeddings)."""

    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 32
    max_seq_len: int = 512
    # SwiGLU hidden width; 0 means round(8/3 * d_model) up to a multiple of 64.
    ffn_hidden: int = 0
    rope_theta: float = 10000.0


@dataclass
class AttnConfig:
    """Attention variant and NSA hyper-parameters (names as in docs/nsa.md)."""

    name: str = "nsa"
    l: int = 32  # compression block length
    d: int = 16  # compression stride
    l_sel: int = 64  # selection block length (l' in the paper)
    n: int = 16  # selected blocks per query, forced ones included
    w: int = 512  # sliding-window length
    # None means "the variant's own choice" (e.g. nsa_no_cmp -> [slc, win]);
    # resolve() writes the effective value so that runs log what they used.
    branches: list[str] | None = None
    shared_kv: bool | None = None
    force_init_local: bool = True
    impl: str = "auto"


@dataclass
class DataConfig:
    """Corpus, tokenizer and batching."""

    source: str = "builtin"  # builtin | python_source | text | json | parquet | hub
    # file/glob for local sources, dataset id for hub; for python_source an optional
    # directory read as the site-packages (default: this interpreter's stdlib + site-packages)
    path: str | None = None
    name: str | None = None  # hub dataset configuration
    split: str = "train"
    text_field: str = "text"
    # Token cache (memory-mapped token files, reused across runs and DDP ranks);
    # None: a folder "token_cache" beside the MLflow store (or in the working directory).
    cache_dir: str | None = None
    tokenizer: str = "byte"  # byte | bpe (byte-level BPE trained on the training split)
    vocab_size: int = 4096  # bpe only: vocabulary size, bytes and end-of-document included
    val_path: str | None = None  # explicit validation file; else a held-out tail
    val_fraction: float = 0.05
    seq_len: int = 256
    batch_size: int = 16
    num_workers: int = 0
    # Share of training sequences replaced by synthetic needle-retrieval samples.
    needle_fraction: float = 0.0
    # Context-length curriculum: the first curriculum_steps steps (rounded up to whole
    # epochs) train on rows of curriculum_seq_len tokens, the same tokens cut shorter.
    curriculum_seq_len: int = 0  # 0: off; else it must divide seq_len
    curriculum_steps: int = 0


@dataclass
class TrainConfig:
    """Optimisation, hardware and checkpointing."""

    max_steps: int = 1000
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation)
    compile: bool = False  # torch.compile the model (see the README for the variants it covers)
    compile_mode: str = "default"  # torch.compile's mode with compile=true (COMPILE_MODES)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 50
    grad_clip: float = 1.0
    precision: str = "auto"  # auto: bf16-mixed where the GPU has bf16, else 32-true
    seed: int = 0
    accelerator: str = "auto"
    devices: str = "auto"  # "auto", a count ("2") or a list ("[0,1]"), as Lightning takes it
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp (Lightning's own strategies)
    # ddp/fsdp: seconds a collective waits for a silent rank before it raises (Lightning's
    # default, 30 min); it bounds how long the others wait on a hung or lost rank.
    dist_timeout_s: int = 1800
    val_every: int = 100
    val_batches: int = 20
    log_every: int = 10
    ckpt_dir: str = "checkpoints"
    # false, true (latest checkpoint of this run name) or a checkpoint path
    resume: str = "false"
    eval_needle: bool = False  # run the needle-in-a-haystack evaluation after training


@dataclass
class TrackingConfig:
    """Where MLflow runs go."""

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "nsa-lab"
    run_name: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    attn: AttnConfig = field(default_factory=AttnConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    """Merge schema defaults, YAML ``files`` and dotlist ``overrides``, then validate.

    Returns a structured (typed, closed) ``DictConfig`` with the variant's
    defaults filled in.
    """
    cfg = OmegaConf.structured(Config)
    for path in files:
        if not Path(path).is_file():
            raise ConfigError("config file", str(path), "no such file")
        _merge(cfg, OmegaConf.load(path), source=str(path))
    _merge(cfg, _parse_overrides(overrides), source="command line")
    resolve(cfg)
    validate(cfg)
    return cfg


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, None, "overrides are written key=value (e.g. attn.l=32)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError("command line", list(overrides), _first_line(exc)) from None


def _merge(cfg: DictConfig, other: DictConfig, source: str) -> None:
    try:
        cfg.merge_with(other)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or source
        value = _lookup(other, key)
        rule = _first_line(exc)
        if "not in" in rule or "Key '" in rule:
            rule = f"unknown key ({source}); see `nsa-lab config` for the valid keys"
        raise ConfigError(key, value, rule) from None


def _lookup(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=False)
    except OmegaConfBaseException:
        return None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]


def resolve(cfg: DictConfig) -> None:
    """Fill the attention fields left as None with the chosen variant's defaults."""
    from nsa_lab.attention import get_variant

    variant = get_variant(cfg.attn.name)  # raises ConfigError for unknown names
    for key, value in variant.defaults.items():
        if cfg.attn[key] is None:
            cfg.attn[key] = value
    if cfg.attn.branches is None:
        cfg.attn.branches = list(BRANCHES)
    if cfg.attn.shared_kv is None:
        cfg.attn.shared_kv = False


def validate(cfg: DictConfig) -> None:
    """Check the rules that types cannot express; raise ConfigError on the first breach."""
    _validate_model(cfg.model)
    _validate_attn(cfg.attn)
    _validate_data(cfg.data, cfg.model)
    _validate_train(cfg.train)
    _validate_tracking(cfg.tracking)


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(key, value, rule)


def _require_positive(section: DictConfig, prefix: str, keys: Sequence[str]) -> None:
    for key in keys:
        _require(section[key] >= 1, f"{prefix}.{key}", section[key], "must be >= 1")


def _require_nonempty(section: DictConfig, prefix: str, keys: Sequence[str]) -> None:
    for key in keys:
        value = section[key]
        _require(bool(str(value).strip()), f"{prefix}.{key}", value, "must not be empty")


def _validate_model(m: DictConfig) -> None:
    _require_positive(
        m, "model", ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "max_seq_len")
    )
    _require(
        m.n_heads % m.n_kv_heads == 0,
        "model.n_heads",
        m.n_heads,
        f"must be a multiple of model.n_kv_heads={m.n_kv_heads} (GQA groups)",
    )
    _require(m.head_dim % 2 == 0, "model.head_dim", m.head_dim, "must be even (RoPE)")
    _require(m.ffn_hidden >= 0, "model.ffn_hidden", m.ffn_hidden, "must be >= 0 (0 = auto)")
    _require(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be > 0")


def _validate_attn(a: DictConfig) -> None:
    _require_positive(a, "attn", ("l", "d", "l_sel", "n", "w"))
    _require(a.l % a.d == 0, "attn.d", a.d, f"must divide attn.l={a.l}")
    _require(a.l_sel % a.d == 0, "attn.d", a.d, f"must divide attn.l_sel={a.l_sel}")
    _require(a.l <= a.l_sel, "attn.l", a.l, f"must be <= attn.l_sel={a.l_sel}")
    if a.force_init_local:
        _require(
            a.n >= 3,
            "attn.n",
            a.n,
            "must be >= 3 when force_init_local=true (1 initial + 2 local blocks are forced)",
        )
    branches = list(a.branches)
    _require(
        len(branches) > 0,
        "attn.branches",
        branches,
        f"must be a non-empty subset of {list(BRANCHES)}",
    )
    for b in branches:
        _require(
            b in BRANCHES, "attn.branches", branches, f"unknown branch {b!r}; use {list(BRANCHES)}"
        )
    _require(len(set(branches)) == len(branches), "attn.branches", branches, "lists a branch twice")
    _require(a.impl in IMPLS, "attn.impl", a.impl, f"must be one of {list(IMPLS)}")


def _validate_data(dc: DictConfig, m: DictConfig) -> None:
    _require(
        dc.source in DATA_SOURCES, "data.source", dc.source, f"must be one of {list(DATA_SOURCES)}"
    )
    _require(
        dc.tokenizer in TOKENIZERS,
        "data.tokenizer",
        dc.tokenizer,
        f"must be one of {list(TOKENIZERS)}",
    )
    if dc.tokenizer == "bpe":
        _require(
            dc.vocab_size >= MIN_BPE_VOCAB,
            "data.vocab_size",
            dc.vocab_size,
            f"must be >= {MIN_BPE_VOCAB} (256 byte tokens + end-of-document + at least one merge)",
        )
    if dc.source not in ("builtin", "python_source"):
        _require(
            dc.path is not None, "data.path", dc.path, f"is required for data.source={dc.source}"
        )
    _require_nonempty(dc, "data", ("split", "text_field"))
    _require_positive(dc, "data", ("seq_len", "batch_size"))
    _require(
        dc.seq_len <= m.max_seq_len,
        "data.seq_len",
        dc.seq_len,
        f"must be <= model.max_seq_len={m.max_seq_len}",
    )
    _require(0 < dc.val_fraction < 1, "data.val_fraction", dc.val_fraction, "must lie in (0, 1)")
    _require(dc.num_workers >= 0, "data.num_workers", dc.num_workers, "must be >= 0")
    _require(
        0 <= dc.needle_fraction <= 1,
        "data.needle_fraction",
        dc.needle_fraction,
        "must lie in [0, 1]",
    )
    _validate_curriculum(dc)


def _validate_curriculum(dc: DictConfig) -> None:
    _require(
        dc.curriculum_seq_len >= 0, "data.curriculum_seq_len", dc.curriculum_seq_len, "must be >= 0"
    )
    _require(dc.curriculum_steps >= 0, "data.curriculum_steps", dc.curriculum_steps, "must be >= 0")
    if dc.curriculum_seq_len == 0:
        _require(
            dc.curriculum_steps == 0,
            "data.curriculum_steps",
            dc.curriculum_steps,
            "needs data.curriculum_seq_len > 0 (the short context length)",
        )
        return
    _require(
        dc.curriculum_seq_len < dc.seq_len and dc.seq_len % dc.curriculum_seq_len == 0,
        "data.curriculum_seq_len",
        dc.curriculum_seq_len,
        f"must be shorter than data.seq_len={dc.seq_len} and divide it",
    )
    _require(
        dc.curriculum_steps > 0,
        "data.curriculum_steps",
        dc.curriculum_steps,
        f"must be > 0 with data.curriculum_seq_len={dc.curriculum_seq_len}",
    )


def _validate_train(t: DictConfig) -> None:
    _require_positive(
        t, "train", ("max_steps", "accumulate", "val_every", "val_batches", "log_every")
    )
    _require(t.lr > 0, "train.lr", t.lr, "must be > 0")
    _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", t.min_lr_ratio, "must lie in [0, 1]")
    _require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
    _require(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "must be >= 0 (0 disables clipping)")
    _require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    for key in ("beta1", "beta2"):
        _require(0 <= t[key] < 1, f"train.{key}", t[key], "must lie in [0, 1) (Adam's beta)")
    _require(0 <= t.seed <= MAX_SEED, "train.seed", t.seed, f"must lie in [0, {MAX_SEED}]")
    _require_positive(t, "train", ("num_nodes", "dist_timeout_s"))
    _require_nonempty(t, "train", ("ckpt_dir",))
    for key, allowed in (
        ("precision", PRECISIONS),
        ("accelerator", ACCELERATORS),
        ("strategy", STRATEGIES),
        ("compile_mode", COMPILE_MODES),
    ):
        _require(t[key] in allowed, f"train.{key}", t[key], f"must be one of {list(allowed)}")
    parse_devices(t.devices)
    resume = str(t.resume)
    _require(
        resume.lower() in RESUME_WORDS or Path(resume).is_file(),
        "train.resume",
        resume,
        "is neither true/false nor an existing checkpoint file",
    )
    _require(
        not (t.eval_needle and t.strategy == "fsdp"),
        "train.eval_needle",
        True,
        "needs the full model on one rank, which FSDP (train.strategy=fsdp) shards; "
        "evaluate the checkpoint with `nsa-lab eval needle` instead",
    )


# train.resume: words that mean "fresh run" and "the latest checkpoint"; else a path.
RESUME_FRESH = ("false", "no", "0", "")
RESUME_LATEST = ("true", "yes", "1")
RESUME_WORDS = RESUME_FRESH + RESUME_LATEST


def parse_devices(value: str) -> int | str | list[int]:
    """``train.devices`` as Lightning takes it: ``"auto"``, a count (``"2"``, ``"-1"`` = all)
    or a list of device indices (``"0,1"`` or ``"[0,1]"``); ConfigError otherwise."""
    text = str(value).strip()
    if text == "auto":
        return text
    if text == "-1":
        return -1
    if text.isdigit():
        if int(text) >= 1:
            return int(text)
    else:
        items = [x.strip() for x in text.strip("[]").split(",") if x.strip()]
        if items and all(x.isdigit() for x in items) and len(set(items)) == len(items):
            return [int(x) for x in items]
    raise ConfigError(
        "train.devices",
        value,
        'must be "auto", a device count >= 1 (-1: all) or a list of indices like "[0,1]"',
    )


def _validate_tracking(tc: DictConfig) -> None:
    uri = tc.uri
    scheme = uri.split(":", 1)[0].lower() if "://" in uri or uri.startswith("file:") else ""
    _require(
        bool(uri.strip()) and (scheme == "" or scheme.split("+")[0] in TRACKING_SCHEMES),
        "tracking.uri",
        uri,
        f"must be a store MLflow can use: a path or a URI with scheme {list(TRACKING_SCHEMES)}",
    )
    if scheme == "sqlite":
        _require(
            uri.startswith(SQLITE_PREFIX) and len(uri) > len(SQLITE_PREFIX),
            "tracking.uri",
            uri,
            "a SQLite store is written sqlite:///PATH (e.g. sqlite:///mlflow.db)",
        )
    if scheme in ("http", "https"):
        _require(
            len(uri.split("://", 1)[1].strip("/")) > 0,
            "tracking.uri",
            uri,
            "names no tracking server host",
        )
    _require_nonempty(tc, "tracking", ("experiment",))


SQLITE_PREFIX = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` store URI (MLflow's or Optuna's), else None.

    Several things live beside a SQLite store (artifacts, the token cache, the Optuna
    study, locks), so this is the one place that reads the path out of such a URI.
    """
    return Path(uri[len(SQLITE_PREFIX) :]) if uri.startswith(SQLITE_PREFIX) else None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """``{"attn.l": 32, ...}``: the config as flat MLflow params (lists as strings)."""
    flat = flatten_keys(OmegaConf.to_container(cfg, resolve=True))
    return {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in flat.items()}


def _is_not_mapping(value: Any) -> bool:
    return not isinstance(value, Mapping)


def flatten_keys(
    value: Mapping[str, Any],
    is_leaf: Callable[[Any], bool] = _is_not_mapping,
    prefix: str = "",
) -> dict[str, Any]:
    """Dotted keys of a nested mapping: ``{attn: {l: x}}`` and ``{attn.l: x}`` both give
    ``{"attn.l": x}``. ``is_leaf`` says which values end a key (default: all but mappings).

    The one config flattener: the MLflow params and the sweep specs both use it.
    """
    out: dict[str, Any] = {}
    for key, raw in value.items():
        full = f"{prefix}{key}"
        if is_leaf(raw):
            out[full] = raw
        else:
            out.update(flatten_keys(raw, is_leaf, f"{full}."))
    return out


def parse_lengths(text: str, option: str = "--lengths") -> list[int]:
    """A command-line length list: ``"256,512,1k"`` -> ``[256, 512, 1024]``."""
    try:
        return [int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in parse_names(text)]
    except ValueError:
        raise ConfigError(option, text, "must be comma-separated token counts") from None


def parse_depths(text: str) -> list[float]:
    """``--depths``: ``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]`` (fractions of the context)."""
    try:
        return [float(x) for x in parse_names(text)]
    except ValueError:
        raise ConfigError("--depths", text, "must be comma-separated fractions in [0, 1]") from None


def parse_names(text: str) -> list[str]:
    """A command-line list of names: ``"full, nsa"`` -> ``["full", "nsa"]``."""
    return [x.strip().lower() for x in text.split(",") if x.strip()]
