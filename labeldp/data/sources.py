"""The dataset registry, and where each dataset's files are found or fetched from.

Lookup order for a dataset's files (the first folder holding all of them wins):

1. the explicit ``data_dir`` argument (``--data-dir``),
2. ``$LABELDP_DATA``,
3. a system folder from a distribution package (Debian's ``dataset-fashion-mnist`` installs
   /usr/share/datasets/fashion-mnist; see :data:`DEBIAN_DIRS`),
4. the download cache ``$XDG_CACHE_HOME/labeldp`` (default ``~/.cache/labeldp``).

In each root the files may lie in ``root/<name>/`` or in ``root/`` itself. IDX files may be
gzip-compressed (``X.gz``) or not (``X``). CIFAR files may be the extracted batches folder or
the official ``.tar.gz`` archive, which is then extracted safely into ``root/<name>/``.

If nothing is found and downloading is allowed, the files are downloaded into the first of
``data_dir``, ``$LABELDP_DATA`` and the cache (as ``<that>/<name>/``), trying each URL of a
file in turn; each download is md5-checked before it is moved into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import IO

from labeldp.errors import ConfigError, DataError
from labeldp.io import atomic_write


@dataclass(frozen=True)
class Remote:
    """One file to download: its name on disk, the md5 of its bytes, and the URLs to try
    in order (primary first, then mirrors)."""

    filename: str
    md5: str
    urls: tuple[str, ...]


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset.

    ``mean``/``std`` are per-channel, in [0, 1] pixel units (pixel / 255). ``hflip`` says
    whether a horizontal flip preserves the class (true for clothes and objects, false for
    digits). ``format`` is ``"idx"`` or ``"cifar"``. ``train_files``/``test_files`` are the
    file names inside the dataset folder (IDX names without ``.gz``; either form is
    accepted). ``subdir`` is the folder the CIFAR archive extracts to, ``label_key`` the
    key of the labels in a CIFAR batch.
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    hflip: bool
    format: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    remotes: tuple[Remote, ...]
    subdir: str = ""
    label_key: str = ""

    @property
    def files(self) -> tuple[str, ...]:
        """All the files the dataset needs (train then test)."""
        return self.train_files + self.test_files

    @property
    def archive(self) -> str | None:
        """The name of the archive holding the files, if the dataset ships as one."""
        for remote in self.remotes:
            if remote.filename.endswith((".tar.gz", ".tgz")):
                return remote.filename
        return None


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx_remotes(md5s: tuple[str, str, str, str], *bases: str) -> tuple[Remote, ...]:
    return tuple(
        Remote(f"{name}.gz", md5, tuple(f"{base}{name}.gz" for base in bases))
        for name, md5 in zip(_IDX_FILES, md5s, strict=True)
    )


_FASHION_BASE = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
)
_FASHION_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_BASE = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_MNIST_MIRROR = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_CIFAR_BASE = "https://www.cs.toronto.edu/~kriz/"

_CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach "
    "couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster "
    "house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree "
    "motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear "
    "pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road "
    "rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel "
    "streetcar sunflower sweet_pepper table tank telephone television tiger tractor train "
    "trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()

DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        num_classes=10,
        channels=1,
        image_size=28,
        mean=(0.2860,),
        std=(0.3530,),
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        hflip=True,
        format="idx",
        train_files=_IDX_FILES[:2],
        test_files=_IDX_FILES[2:],
        remotes=_idx_remotes(
            (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            ),
            _FASHION_BASE,
            _FASHION_MIRROR,
        ),
    ),
    "mnist": DatasetInfo(
        name="mnist",
        num_classes=10,
        channels=1,
        image_size=28,
        mean=(0.1307,),
        std=(0.3081,),
        class_names=tuple(str(d) for d in range(10)),
        hflip=False,
        format="idx",
        train_files=_IDX_FILES[:2],
        test_files=_IDX_FILES[2:],
        remotes=_idx_remotes(
            (
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ),
            _MNIST_BASE,
            _MNIST_MIRROR,
        ),
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        num_classes=10,
        channels=3,
        image_size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        class_names=(
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
        hflip=True,
        format="cifar",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        remotes=(
            Remote(
                "cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a",
                (f"{_CIFAR_BASE}cifar-10-python.tar.gz",),
            ),
        ),
        subdir="cifar-10-batches-py",
        label_key="labels",
    ),
    "cifar100": DatasetInfo(
        name="cifar100",
        num_classes=100,
        channels=3,
        image_size=32,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        class_names=tuple(_CIFAR100_CLASSES),
        hflip=True,
        format="cifar",
        train_files=("train",),
        test_files=("test",),
        remotes=(
            Remote(
                "cifar-100-python.tar.gz",
                "eb9058c3a382ffc7106e4002c42a8d85",
                (f"{_CIFAR_BASE}cifar-100-python.tar.gz",),
            ),
        ),
        subdir="cifar-100-python",
        label_key="fine_labels",
    ),
}

#: Folders that distribution packages install datasets into (tests monkeypatch this).
DEBIAN_DIRS: dict[str, Path] = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}

#: Distribution packages that provide a dataset, for the "how to get it" hint.
DEBIAN_PACKAGES: dict[str, str] = {"fashion-mnist": "dataset-fashion-mnist"}


def get_info(name: str | DatasetInfo) -> DatasetInfo:
    """The :class:`DatasetInfo` of a dataset name (a ``DatasetInfo`` is returned as is).
    Raises ``ConfigError`` listing the known names for an unknown one."""
    if isinstance(name, DatasetInfo):
        return name
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}"
        ) from None


def cache_dir() -> Path:
    """The default download cache: ``$XDG_CACHE_HOME/labeldp``, else ``~/.cache/labeldp``."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "labeldp"


def search_roots(name: str | DatasetInfo, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The roots searched for a dataset, in priority order (see the module docstring)."""
    info = get_info(name)
    roots: list[Path] = []
    if data_dir is not None and str(data_dir) != "":
        roots.append(Path(data_dir).expanduser())
    if os.environ.get("LABELDP_DATA"):
        roots.append(Path(os.environ["LABELDP_DATA"]).expanduser())
    if info.name in DEBIAN_DIRS:
        roots.append(Path(DEBIAN_DIRS[info.name]))
    roots.append(cache_dir())
    unique: list[Path] = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique


def _candidate_dirs(info: DatasetInfo, root: Path) -> list[Path]:
    if info.subdir:
        return [root / info.name / info.subdir, root / info.name, root / info.subdir, root]
    return [root / info.name, root]


def find_file(info: DatasetInfo, folder: Path, filename: str) -> Path | None:
    """The path of ``filename`` in ``folder`` (for IDX also ``filename.gz``), or None."""
    names = [filename, f"{filename}.gz"] if info.format == "idx" else [filename]
    for candidate in names:
        path = folder / candidate
        if path.is_file():
            return path
    return None


def _present(info: DatasetInfo, folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return [f for f in info.files if find_file(info, folder, f) is not None]


def _wanted(info: DatasetInfo) -> str:
    suffix = "[.gz]" if info.format == "idx" else ""
    return ", ".join(f"{f}{suffix}" for f in info.files)


def _missing_message(
    info: DatasetInfo, searched: list[Path], partial: list[str], extra: str = ""
) -> str:
    archive = f" (or the archive {info.archive})" if info.archive else ""
    how = [f"run `labeldp data fetch {info.name}`"]
    if info.name in DEBIAN_PACKAGES:
        how.append(f"`apt-get install {DEBIAN_PACKAGES[info.name]}`")
    how.append("pass --data-dir (or set $LABELDP_DATA) to a folder holding the files")
    msg = (
        f"dataset {info.name!r} not found: looked for {_wanted(info)}{archive} in "
        f"{', '.join(str(p) for p in searched)}"
    )
    if partial:
        msg += f"; incomplete: {'; '.join(partial)}"
    if extra:
        msg += f"; {extra}"
    return msg + f"; to get it, {', or '.join(how)}"


def _find_in_root(
    info: DatasetInfo, root: Path, searched: list[Path], partial: list[str]
) -> Path | None:
    """Look for the dataset in one root; extracts an archive found there. Records what it
    searched and which folders held only some of the files."""
    for folder in _candidate_dirs(info, root):
        searched.append(folder)
        present = _present(info, folder)
        if len(present) == len(info.files):
            return folder
        if present:
            partial.append(f"{folder} holds only {', '.join(present)}")
    if info.archive:
        for archive in (root / info.name / info.archive, root / info.archive):
            if archive.is_file():
                return extract_archive(info, archive, root / info.name)
    return None


def locate(
    name: str | DatasetInfo, data_dir: str | os.PathLike | None = None, download: bool = False
) -> Path:
    """The folder holding all of a dataset's files, searched in the documented order.

    ``name`` is a registered name or a ``DatasetInfo`` (tests pass modified ones). With
    ``download=True`` a dataset found nowhere is downloaded (see :func:`fetch`). Raises
    ``DataError`` naming every folder searched when the files are not found (or cannot
    be downloaded), ``ConfigError`` for an unknown name.
    """
    info = get_info(name)
    searched: list[Path] = []
    partial: list[str] = []
    for root in search_roots(info, data_dir):
        folder = _find_in_root(info, root, searched, partial)
        if folder is not None:
            return folder
    if not download:
        raise DataError(_missing_message(info, searched, partial))
    return _download_dataset(info, data_dir, searched, partial)


def fetch(name: str | DatasetInfo, data_dir: str | os.PathLike | None = None) -> Path:
    """Make sure a dataset is on disk, downloading it if it is found nowhere; returns the
    folder holding its files."""
    return locate(name, data_dir, download=True)


def _download_root(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    if os.environ.get("LABELDP_DATA"):
        return Path(os.environ["LABELDP_DATA"]).expanduser()
    return cache_dir()


def _download_dataset(
    info: DatasetInfo, data_dir: str | os.PathLike | None, searched: list[Path], partial: list[str]
) -> Path:
    root = _download_root(data_dir)
    folder = root / info.name
    for remote in info.remotes:
        dest = folder / remote.filename
        stem = remote.filename.removesuffix(".gz") if info.format == "idx" else None
        if dest.is_file() or (stem is not None and (folder / stem).is_file()):
            continue  # fetched by an earlier, interrupted run (downloads land atomically)
        failures: list[str] = []
        for url in remote.urls:
            try:
                download(url, dest, remote.md5)
                break
            except DataError as exc:
                failures.append(str(exc))
        else:
            raise DataError(
                _missing_message(
                    info,
                    searched,
                    partial,
                    extra=f"downloading into {folder} failed: {' | '.join(failures)}",
                )
            )
    found = _find_in_root(info, root, [], [])
    if found is None:
        raise DataError(
            f"downloaded {info.name!r} into {folder}, but it does not hold "
            f"{_wanted(info)}; delete {folder} and try again"
        )
    return found


def download(url: str, dest: str | os.PathLike, md5: str, timeout: float = 60) -> Path:
    """Download ``url`` to ``dest``, checking the md5 of the bytes before moving them into
    place (through a temporary file and ``os.replace``: a failed or mismatching download
    leaves nothing behind). ``timeout`` is in seconds per network operation. Raises
    ``DataError`` naming the URL on any failure; on a checksum mismatch it names the
    expected and actual md5. Shows a tqdm progress bar on stderr for large files."""
    dest = Path(dest)

    def write(out: IO[bytes]) -> None:
        digest = hashlib.md5()
        request = urllib.request.Request(url, headers={"User-Agent": "labeldp"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with _Progress(total, dest.name) as update:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    update(len(chunk))
        actual = digest.hexdigest()
        if actual != md5.lower():
            raise DataError(
                f"checksum mismatch for {url}: expected md5 {md5}, got {actual}; "
                "the download is corrupt or the file changed upstream"
            )

    try:
        return atomic_write(dest, write)
    except DataError:
        raise
    except urllib.error.HTTPError as exc:
        raise DataError(f"could not download {url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DataError(f"could not download {url}: {exc.reason}") from exc
    except (OSError, HTTPException, ValueError) as exc:
        raise DataError(f"could not download {url}: {type(exc).__name__}: {exc}") from exc


class _Progress:
    """A context manager yielding ``update(n_bytes)``; a tqdm bar on stderr for files of
    a megabyte or more (only when stderr is a terminal), otherwise a no-op."""

    def __init__(self, total: int | None, desc: str) -> None:
        self._bar = None
        if total is None or total >= 1 << 20:
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                return
            self._bar = tqdm(
                total=total,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                disable=None,
                leave=False,
            )

    def __enter__(self):
        return self._bar.update if self._bar is not None else (lambda n: None)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()


def _safe_members(archive: Path, tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        parts = PurePosixPath(member.name).parts
        if member.name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise DataError(
                f"refusing to extract {archive}: member {member.name!r} has an "
                "absolute path or '..'; the archive is corrupt or malicious"
            )
        if not (member.isfile() or member.isdir()):
            raise DataError(
                f"refusing to extract {archive}: member {member.name!r} is a "
                "link or special file, which dataset archives never hold"
            )
        yield member


def extract_archive(info: DatasetInfo, archive: Path, target: Path) -> Path:
    """Extract a dataset ``.tar.gz`` into ``target`` and return the folder with the files
    (``target/<info.subdir>``).

    Members with absolute paths, ``..`` or links are refused. The archive is extracted into
    a temporary folder inside ``target`` and renamed into place only once complete, so an
    interrupted extraction is never mistaken for a complete one.
    """
    final = target / info.subdir if info.subdir else target
    fix = f"delete {archive} and run `labeldp data fetch {info.name}`"
    try:
        target.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".extract-{info.name}-", dir=target))
    except OSError as exc:
        raise DataError(
            f"cannot extract {archive} into {target}: {exc.strerror or exc}; "
            "pass a writable --data-dir or extract it yourself"
        ) from exc
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in _safe_members(archive, tar):
                    out = tmp / member.name
                    if member.isdir():
                        out.mkdir(parents=True, exist_ok=True)
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None  # regular file
                    with source, open(out, "wb") as sink:
                        shutil.copyfileobj(source, sink, 1 << 20)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"{archive} is not a valid .tar.gz archive ({exc}); {fix}") from exc
        extracted = tmp / info.subdir if info.subdir else tmp
        missing = [f for f in info.files if find_file(info, extracted, f) is None]
        if missing:
            raise DataError(f"{archive} does not hold {info.subdir}/{', '.join(missing)}; {fix}")
        if info.subdir:
            if final.exists():  # an incomplete earlier extraction: set it aside, then drop it
                stale = Path(tempfile.mkdtemp(prefix=f".stale-{info.name}-", dir=target))
                os.replace(final, stale / final.name)
            os.replace(extracted, final)
        else:
            for name in info.files:
                os.replace(extracted / name, final / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for stale_dir in target.glob(f".stale-{info.name}-*"):
            shutil.rmtree(stale_dir, ignore_errors=True)
    return final
