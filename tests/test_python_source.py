"""``data.source=python_source`` on a small synthetic site-packages tree."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from nsa_lab.config import ConfigError, DataConfig
from nsa_lab.data import ByteTokenizer, NSADataModule
from nsa_lab.data.python_source import (
    default_roots,
    find_packages,
    is_validation_package,
    python_roots,
)

TOK = ByteTokenizer()
# With val_fraction=0.5 the name hash puts gamma in validation, alpha and beta in training.
VAL_FRACTION = 0.5
BODY = "def f(x):\n    return x + 1\n" * 8
LATIN1 = "# caf\u00e9\n".encode("latin-1")


def site_packages(root: Path) -> Path:
    """alpha/ (a package with a subpackage), beta.py (a module), gamma/ (an empty file, a
    non-UTF-8 file and a broken link), and entries that are not packages."""
    files = {
        "alpha/__init__.py": "from alpha.core import f\n",
        "alpha/core.py": BODY,
        "alpha/sub/deep.py": BODY.replace("f", "g"),  # no final newline below
        "alpha/__pycache__/core.cpython-311.py": "cached",
        "alpha/not-a-package/x.py": "skipped",
        "alpha/data.txt": "not python",
        "beta.py": BODY.replace("x", "y"),
        "gamma/__init__.py": "",
        "alpha_dist-1.0.dist-info/RECORD.py": "skipped",
        "x.py/inner.py": "skipped",  # a directory named x.py
        "only_data/readme.txt": "no python here",
        "README.py.txt": "skipped",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.rstrip("\n") if name == "alpha/sub/deep.py" else text)
    (root / "gamma" / "latin.py").write_bytes(LATIN1 * 40)
    (root / "gamma" / "gone.py").symlink_to(root / "nowhere.py")  # listed, unreadable
    return root


def data_cfg(**overrides: Any) -> DictConfig:
    cfg = OmegaConf.structured(DataConfig)
    cfg.merge_with({"source": "python_source", "seq_len": 16, "batch_size": 2, **overrides})
    return cfg


def built(root: Path, cache: Path, **overrides: Any) -> NSADataModule:
    cfg = data_cfg(path=str(root), val_fraction=VAL_FRACTION, **overrides)
    dm = NSADataModule(cfg, seed=0, cache_dir=cache)
    dm.setup()
    return dm


def text_of(tokens: Any) -> bytes:
    return bytes(t for t in tokens.tolist() if t != TOK.eos_id)


def test_packages_are_importable_top_level_names_with_their_py_files(tmp_path: Path) -> None:
    root = site_packages(tmp_path / "site")
    packages = {p.name: p for p in find_packages(python_roots(str(root)))}
    assert sorted(packages) == ["alpha", "beta", "gamma"]
    relative = {n: [os.path.relpath(f, root) for f in p.files] for n, p in packages.items()}
    assert relative == {
        "alpha": ["alpha/__init__.py", "alpha/core.py", "alpha/sub/deep.py"],
        "beta": ["beta.py"],
        "gamma": ["gamma/__init__.py", "gamma/gone.py", "gamma/latin.py"],
    }


def test_a_name_in_two_roots_is_read_from_the_first(tmp_path: Path) -> None:
    first, second = tmp_path / "stdlib", tmp_path / "site"
    for root, text in ((first, "first"), (second, "second")):
        (root / "shared").mkdir(parents=True)
        (root / "shared" / "__init__.py").write_text(text)
    (second / "extra.py").write_text("x = 1\n")
    packages = find_packages([str(first), str(second)])
    assert [(p.name, p.root) for p in packages] == [("extra", str(second)), ("shared", str(first))]


def test_documents_are_packages_with_a_header_per_file_and_validation_packages(
    tmp_path: Path,
) -> None:
    root = site_packages(tmp_path / "site")
    dm = built(root, tmp_path / "cache")
    assert not is_validation_package("alpha", VAL_FRACTION)
    assert not is_validation_package("beta", VAL_FRACTION)
    assert is_validation_package("gamma", VAL_FRACTION)
    alpha = (
        "# file: alpha/__init__.py\nfrom alpha.core import f\n"
        f"# file: alpha/core.py\n{BODY}"
        f"# file: alpha/sub/deep.py\n{BODY.replace('f', 'g')}"  # newline added before a header
    )
    beta = f"# file: beta.py\n{BODY.replace('x', 'y')}"
    train, val = dm.train_set.tokens.tolist(), dm.val_set.tokens.tolist()
    assert train == [*alpha.encode(), TOK.eos_id, *beta.encode(), TOK.eos_id]
    gamma = b"# file: gamma/__init__.py\n# file: gamma/latin.py\n" + LATIN1 * 40
    assert val == [*gamma, TOK.eos_id]  # the unreadable link left out, raw bytes kept
    assert b"# file: gamma" not in text_of(dm.train_set.tokens)


def test_corpus_stats_cover_both_splits_and_become_params(tmp_path: Path) -> None:
    root = site_packages(tmp_path / "site")
    stats = built(root, tmp_path / "cache").corpus_stats
    assert (stats.n_documents, stats.n_files) == (3, 7)
    assert (stats.non_utf8_files, stats.skipped_files) == (1, 1)
    read = ["alpha/__init__.py", "alpha/core.py", "alpha/sub/deep.py", "beta.py"]
    read += ["gamma/__init__.py", "gamma/latin.py"]
    assert stats.n_bytes == sum((root / f).stat().st_size for f in read)
    params = stats.params()
    assert params["data.corpus_files"] == 7 and params["data.corpus_digest"] == stats.digest
    assert set(params) >= {"data.corpus_bytes", "data.corpus_documents", "data.corpus_tokens"}
    (root / "beta.py").write_text("changed\n" * 50)
    assert built(root, tmp_path / "cache").corpus_stats.digest != stats.digest


def test_val_path_makes_every_package_a_training_package(tmp_path: Path) -> None:
    root = site_packages(tmp_path / "site")
    (tmp_path / "val.txt").write_text("held-out text " * 20)
    dm = built(root, tmp_path / "cache", val_path=str(tmp_path / "val.txt"))
    assert b"# file: gamma/latin.py" in text_of(dm.train_set.tokens)
    assert text_of(dm.val_set.tokens) == b"held-out text " * 20


def test_bad_trees_and_splits_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "no_python" / "pkg").mkdir(parents=True)
    (tmp_path / "no_python" / "pkg" / "data.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"data\.path=.*no_python.*holds no \.py file"):
        NSADataModule(data_cfg(path=str(tmp_path / "no_python")), seed=0)
    (tmp_path / "empty" / "pkg").mkdir(parents=True)
    (tmp_path / "empty" / "pkg" / "__init__.py").write_text("")
    with pytest.raises(ConfigError, match=r"data\.path=.*empty.*has no text"):
        NSADataModule(data_cfg(path=str(tmp_path / "empty")), seed=0)
    with pytest.raises(ConfigError, match=r"data\.path=.*missing.*is not a directory"):
        NSADataModule(data_cfg(path=str(tmp_path / "missing")), seed=0)
    root = site_packages(tmp_path / "site")
    with pytest.raises(ConfigError, match=r"data\.val_fraction=0\.01: leaves no package for val"):
        NSADataModule(data_cfg(path=str(root), val_fraction=0.01), seed=0)


def test_without_a_path_it_reads_the_stdlib_and_this_environments_site_packages() -> None:
    paths = sysconfig.get_paths()
    roots = default_roots()
    assert roots[0] == os.path.realpath(paths["stdlib"])
    assert os.path.realpath(paths["purelib"]) in roots
    names = {p.name for p in find_packages(roots)}
    assert {"json", "os", "numpy", "torch"} <= names  # stdlib and site-packages
    assert not {n for n in names if not n.isidentifier() or n == "__pycache__"}


@pytest.mark.slow
def test_a_run_logs_the_corpus_it_read_as_params(workdir: Path) -> None:
    from nsa_lab.cli import main
    from tests.test_train_e2e import only_run, smoke_args

    root = site_packages(workdir / "site")
    overrides = ["data.source=python_source", f"data.path={root}", "data.seq_len=32"]
    overrides += [f"data.val_fraction={VAL_FRACTION}", "train.max_steps=2", "train.log_every=1"]
    assert main(["train", *smoke_args(workdir, *overrides)]) == 0
    params = only_run(workdir)[1].data.params
    assert params["data.corpus_files"] == "7" and params["data.corpus_documents"] == "3"
    assert params["data.corpus_non_utf8_files"] == "1"
    assert params["data.corpus_skipped_files"] == "1"
    assert list((workdir / "token_cache").glob("python_source-*/tokens.bin"))
