"""``data.source=python_source``: the Python code every machine with the platform already has.

The corpus is this interpreter's standard library plus its site-packages
(``sysconfig``'s ``stdlib``, ``purelib`` and ``platlib``), or, when ``data.path`` is
set, that one directory read as a site-packages (tests use a small synthetic tree,
and a hermetic corpus must not depend on what else is installed). Hundreds of MB of
real code with long-range structure: definitions are used far from where they are
written, which is what long-context attention has to exploit.

A *document* is one top-level package: a directory whose name could be imported
(an identifier; ``__pycache__`` excluded) holding ``.py`` files, or a single
top-level module ``name.py``. Its files are read in path order, recursing only into
importable subdirectories, and each is preceded by a header line naming it relative
to its root (``# file: numpy/core/_methods.py``). A name found in several roots is
taken from the first, as ``import`` would (the stdlib shadows a same-named
backport in site-packages; a venv's site-packages is the only one an isolated venv
imports, so the system's is not read). ``*.dist-info``, ``*.egg-info``,
``site-packages`` inside the stdlib and other non-identifier entries are skipped.

Validation is a fixed set of whole packages, chosen by a hash of the package name
(:func:`is_validation_package`), so no package is both trained and validated on and
the split does not move when other packages are installed.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nsa_lab.config import ConfigError

HEADER = "# file: {path}\n"
_SPLIT_BUCKETS = 10_000


@dataclass(frozen=True)
class Package:
    """A top-level package (or module) and its ``.py`` files, absolute, in path order."""

    name: str
    root: str
    files: tuple[str, ...]


def default_roots() -> tuple[str, ...]:
    """The stdlib, then the site-packages this interpreter imports from, without repeats."""
    paths = sysconfig.get_paths()
    roots = (paths["stdlib"], paths["purelib"], paths["platlib"])
    return tuple(dict.fromkeys(os.path.realpath(r) for r in roots if os.path.isdir(r)))


def python_roots(path: str | None) -> tuple[str, ...]:
    """The directories to read: ``path`` alone when given (checked), else :func:`default_roots`."""
    if path is None:
        return default_roots()
    root = os.path.expanduser(path)
    if not os.path.isdir(root):
        raise ConfigError("data.path", path, "is not a directory (python_source reads a folder)")
    return (os.path.abspath(root),)


def find_packages(roots: Sequence[str]) -> list[Package]:
    """Every top-level package with at least one ``.py`` file, sorted by name; the first
    root that holds a name wins."""
    found: dict[str, Package] = {}
    for root in roots:
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            package = _package_at(root, entry)
            if package is not None and package.name not in found:
                found[package.name] = package
    return [found[name] for name in sorted(found)]


def _package_at(root: str, entry: os.DirEntry) -> Package | None:
    if entry.is_dir():
        if not _importable(entry.name):
            return None
        files = tuple(_py_files(entry.path))
    elif entry.name.endswith(".py") and _importable(entry.name[: -len(".py")]):
        files = (entry.path,)
    else:
        return None
    name = entry.name.removesuffix(".py")
    return Package(name, root, files) if files else None


def _importable(name: str) -> bool:
    return name.isidentifier() and name != "__pycache__"


def _py_files(folder: str) -> Iterable[str]:
    """The ``.py`` files under ``folder`` in path order, entering importable folders only.

    Everything listed as a file is kept, even a broken link: the reader counts what it
    cannot read instead of the listing hiding it.
    """
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if _importable(d)]
        found.extend(os.path.join(here, f) for f in files if f.endswith(".py"))
    return sorted(found)


def header(root: str, path: str) -> bytes:
    """The line that precedes ``path`` in its package's document (named relative to ``root``)."""
    relative = Path(os.path.relpath(path, root)).as_posix()
    return HEADER.format(path=relative).encode("utf-8")


def is_validation_package(name: str, val_fraction: float) -> bool:
    """Whether ``name`` belongs to the validation split: a stable hash of the name (not
    Python's salted ``hash``) falls below ``val_fraction`` of the buckets."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _SPLIT_BUCKETS < val_fraction * _SPLIT_BUCKETS


def split_packages(
    packages: Sequence[Package], val_fraction: float
) -> tuple[list[Package], list[Package]]:
    """Training and validation packages; each side must hold at least one."""
    val = [p for p in packages if is_validation_package(p.name, val_fraction)]
    train = [p for p in packages if not is_validation_package(p.name, val_fraction)]
    if not train or not val:
        side = "validation" if not val else "training"
        raise ConfigError(
            "data.val_fraction",
            val_fraction,
            f"leaves no package for {side} among the {len(packages)} packages of the corpus "
            "(the split is by a hash of the package name); change data.val_fraction",
        )
    return train, val
