"""Every key of the config schema is checked by ``load_config`` before any work starts.

The test walks the schema dataclasses, so a key added to ``nsa_lab/config.py`` without a
row in ``BAD_VALUES`` (or in ``FREE_KEYS``, with the reason no value of it is invalid)
fails here until someone decides how it is checked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from nsa_lab.config import Config, ConfigError, load_config

# key: (a bad value, other overrides that make the value's rule apply)
BAD_VALUES: dict[str, tuple[str, tuple[str, ...]]] = {
    "model.n_layers": ("0", ()),
    "model.d_model": ("0", ()),
    "model.n_heads": ("3", ()),  # not a multiple of n_kv_heads=2
    "model.n_kv_heads": ("0", ()),
    "model.head_dim": ("31", ()),  # odd: RoPE rotates pairs
    "model.max_seq_len": ("0", ()),
    "model.ffn_hidden": ("-1", ()),
    "model.rope_theta": ("0", ()),
    "attn.name": ("no_such_variant", ()),
    "attn.l": ("0", ()),
    "attn.d": ("5", ()),  # does not divide l=32
    "attn.l_sel": ("0", ()),
    "attn.n": ("2", ()),  # < 3 with force_init_local
    "attn.w": ("0", ()),
    "attn.branches": ("[cmp,bogus]", ()),
    "attn.shared_kv": ("maybe", ()),
    "attn.force_init_local": ("maybe", ()),
    "attn.impl": ("cuda", ()),
    "data.source": ("ftp", ()),
    "data.path": ("null", ("data.source=text",)),  # required by a file source
    "data.split": ("''", ()),
    "data.text_field": ("''", ()),
    "data.tokenizer": ("words", ()),
    "data.vocab_size": ("100", ("data.tokenizer=bpe",)),
    "data.val_fraction": ("1.0", ()),
    "data.seq_len": ("1024", ()),  # > model.max_seq_len=512
    "data.batch_size": ("0", ()),
    "data.num_workers": ("-1", ()),
    "data.needle_fraction": ("1.5", ()),
    "data.curriculum_seq_len": ("100", ()),  # does not divide seq_len=256
    "data.curriculum_steps": ("5", ()),  # without curriculum_seq_len
    "train.max_steps": ("0", ()),
    "train.accumulate": ("0", ()),
    "train.compile": ("maybe", ()),
    "train.compile_mode": ("fastest", ()),
    "train.lr": ("0", ()),
    "train.min_lr_ratio": ("1.5", ()),
    "train.weight_decay": ("-0.1", ()),
    "train.beta1": ("1.0", ()),
    "train.beta2": ("-0.5", ()),
    "train.warmup_steps": ("-1", ()),
    "train.grad_clip": ("-1", ()),
    "train.precision": ("fp8", ()),
    "train.seed": ("-1", ()),
    "train.accelerator": ("quantum", ()),
    "train.devices": ("two", ()),
    "train.num_nodes": ("0", ()),
    "train.strategy": ("deepspeed", ()),
    "train.dist_timeout_s": ("0", ()),
    "train.val_every": ("0", ()),
    "train.val_batches": ("0", ()),
    "train.log_every": ("0", ()),
    "train.ckpt_dir": ("''", ()),
    "train.resume": ("/no/such/checkpoint.ckpt", ()),
    "train.eval_needle": ("true", ("train.strategy=fsdp",)),
    "tracking.uri": ("ftp://host/x", ()),
    "tracking.experiment": ("''", ()),
}

# Keys no value of which is invalid at config time, and why.
FREE_KEYS: dict[str, str] = {
    "data.name": "a hub dataset configuration: any name (or none); the hub checks it",
    "data.cache_dir": "any folder (none: beside the tracking store); created when needed",
    "data.val_path": "any file; read (and checked) when the data module sets up, before a run",
    "tracking.run_name": "any name (none: the variant and the time)",
}


def schema_keys(cls: type = Config, prefix: str = "") -> Iterator[str]:
    """Every leaf key of the schema, dotted, walking nested dataclasses."""
    for f in dataclasses.fields(cls):
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            yield from schema_keys(factory, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


KEYS = list(schema_keys())


def test_every_schema_key_has_a_bad_value_or_is_declared_free():
    missing = [k for k in KEYS if k not in BAD_VALUES and k not in FREE_KEYS]
    assert not missing, f"add these keys to BAD_VALUES or FREE_KEYS: {missing}"
    stale = sorted((BAD_VALUES.keys() | FREE_KEYS.keys()) - set(KEYS))
    assert not stale, f"not schema keys (any more): {stale}"
    assert not BAD_VALUES.keys() & FREE_KEYS.keys()


def test_the_defaults_and_every_context_override_are_valid():
    """So that each refusal below is the bad value's, not its context's."""
    load_config()
    for key, (_, extra) in BAD_VALUES.items():
        good = {"data.path": ["data.path=corpus.txt"]}.get(key, [])
        load_config(overrides=[*extra, *good])


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_a_bad_value_of_each_key_is_refused_naming_the_key(key: str):
    value, extra = BAD_VALUES[key]
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[*extra, f"{key}={value}"])
    assert info.value.key == key, str(info.value)
    assert key in str(info.value)


@pytest.mark.parametrize("devices", ["auto", "1", "2", "-1", "0,1", "[0,1]", "[0, 1]", "[3]"])
def test_train_devices_takes_what_lightning_takes(devices: str):
    assert load_config(overrides=[f"train.devices='{devices}'"]).train.devices == devices


@pytest.mark.parametrize("devices", ["0", "-2", "[]", "0,0", "[a,b]", "1.5", ""])
def test_train_devices_refuses_the_rest(devices: str):
    with pytest.raises(ConfigError, match="train.devices"):
        load_config(overrides=[f"train.devices='{devices}'"])


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///mlflow.db",
        "sqlite:////abs/path/mlflow.db",
        "file:///tmp/mlruns",
        "file:mlruns",
        "mlruns",
        "/abs/mlruns",
        "http://127.0.0.1:5000",
        "https://mlflow.example.org",
        "databricks",
        "databricks://profile",
        "postgresql://user@host/db",
        "mysql+pymysql://user@host/db",
    ],
)
def test_tracking_uri_takes_mlflow_stores(uri: str):
    assert load_config(overrides=[f"tracking.uri='{uri}'"]).tracking.uri == uri


@pytest.mark.parametrize(
    "uri", ["ftp://host/x", "s3://bucket/x", "sqlite://", "sqlite:///", "http://", "''"]
)
def test_tracking_uri_refuses_other_schemes(uri: str):
    with pytest.raises(ConfigError, match="tracking.uri"):
        load_config(overrides=[f"tracking.uri={uri}"])


@pytest.mark.parametrize("accelerator", ["auto", "cpu", "gpu", "cuda", "mps"])
def test_train_accelerator_takes_lightnings_own(accelerator: str):
    assert load_config(overrides=[f"train.accelerator={accelerator}"]).train.accelerator
