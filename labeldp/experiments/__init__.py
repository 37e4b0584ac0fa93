"""The packaged sweep files: the TOML files beside this module (package data, installed
with labeldp), found through :mod:`importlib.resources`, so that ``labeldp sweep
fashion_mnist_quick`` and ``labeldp reproduce`` work from any directory of an installed
labeldp, not only from a source checkout. README.md here lists them and every key of a
sweep file.

A command's sweep argument is a path to the user's own TOML file or the name of a packaged
one (``fashion_mnist_quick`` or ``fashion_mnist_quick.toml``), see :func:`resolve`. A
companion audit sweep (``audits = "<file>.toml"``) is resolved next to the sweep file that
names it, packaged or not (labeldp.sweep).
"""

from __future__ import annotations

import difflib
import shutil
import tempfile
from functools import cache
from importlib.resources import as_file, files
from pathlib import Path

from ..errors import ConfigError

SUFFIX = ".toml"


def folder() -> Path:
    """The folder of the packaged sweep files, as a real directory: the package's own
    folder (a normal install or a checkout), else (a zipped install) a temporary copy of
    the files, made once per process."""
    root = files(__name__)
    if isinstance(root, Path):
        return root
    return _extracted()


@cache
def _extracted() -> Path:
    """The packaged sweep files copied into a temporary folder, for an installation that is
    not a folder on disk (a zip): companion files must lie beside the file naming them."""
    target = Path(tempfile.mkdtemp(prefix="labeldp-experiments-"))
    for entry in files(__name__).iterdir():
        if entry.name.endswith(SUFFIX):
            with as_file(entry) as path:
                shutil.copyfile(path, target / entry.name)
    return target


def names() -> list[str]:
    """The packaged sweep files' names (without ``.toml``), sorted."""
    return sorted(p.name[: -len(SUFFIX)] for p in folder().iterdir() if p.name.endswith(SUFFIX))


def find(name: str) -> Path:
    """The packaged sweep file ``name`` (``fashion_mnist_quick`` or
    ``fashion_mnist_quick.toml``); ConfigError listing the packaged ones otherwise."""
    stem = _stem(name)
    if stem in names():
        return folder() / f"{stem}{SUFFIX}"
    raise ConfigError(f"{name!r} {_not_packaged(stem)}")


def _stem(name: str) -> str:
    """``name`` without a trailing ``.toml``."""
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name


def _not_packaged(stem: str) -> str:
    """The rest of the error for a name that is no packaged sweep file: the closest names
    first (the whole list is long enough to be cut from a one-line error), then what to
    give instead, then every packaged name."""
    close = difflib.get_close_matches(stem, names(), n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return (
        f"is no packaged sweep file{hint}; give the path of your own TOML file or one of "
        f"the packaged: {', '.join(names())}"
    )


def resolve(name_or_path: str | Path) -> Path:
    """The sweep file a command names: an existing file at ``name_or_path`` (the user's
    own TOML file, as typed, relative to the current directory), else the packaged sweep
    file of that name. Neither: ConfigError naming the argument and listing the packaged
    sweep files."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    text, stem = str(name_or_path), _stem(path.name)
    if path.name == text and text not in ("", ".", ".."):  # a bare name, no folder
        if stem in names():
            return find(stem)
    where = "is a folder, not a sweep file" if path.is_dir() else "does not exist"
    raise ConfigError(f"sweep file {text} {where}, and {text!r} {_not_packaged(stem)}")
