"""Where dataset files are found, extracted and downloaded from (local HTTP server only)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import pickle
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from fakes import isolate_data_sources, write_mnist_like

from labeldp.data import (
    DATASETS,
    Remote,
    download,
    fetch,
    load_splits,
    locate,
    search_roots,
    sources,
)
from labeldp.errors import ConfigError, DataError

FASHION = DATASETS["fashion-mnist"]
CIFAR10 = DATASETS["cifar10"]


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $LABELDP_DATA, no system folders, and a cache inside tmp_path."""
    return isolate_data_sources(monkeypatch, tmp_path)


def cifar10_tar(path: Path, per_batch: int = 4, extra: dict[str, bytes] | None = None) -> Path:
    """A CIFAR-10 archive in the official layout with small batches."""
    rng = np.random.default_rng(0)
    members: dict[str, bytes] = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(x) for x in rng.integers(0, 10, per_batch)],
            b"data": np.full((per_batch, 3072), i, np.uint8),
            b"filenames": [b"f%d.png" % j for j in range(per_batch)],
        }
        members[f"cifar-10-batches-py/{name}"] = pickle.dumps(batch, protocol=2)
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": []}, protocol=2)
    members.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --- lookup ----------------------------------------------------------------------------


def test_unknown_dataset() -> None:
    with pytest.raises(
        ConfigError, match="unknown dataset 'svhn'.*cifar10, cifar100, fashion-mnist, mnist"
    ):
        locate("svhn")


def test_registry_consistent() -> None:
    assert set(DATASETS) == {"fashion-mnist", "mnist", "cifar10", "cifar100"}
    for name, info in DATASETS.items():
        assert info.name == name
        assert len(info.class_names) == info.num_classes == len(set(info.class_names))
        assert len(info.mean) == len(info.std) == info.channels
        assert all(0 < v < 1 for v in info.mean + info.std)
        assert all(len(r.md5) == 32 and r.urls for r in info.remotes)
    assert not DATASETS["mnist"].hflip and DATASETS["fashion-mnist"].hflip
    assert DATASETS["cifar100"].label_key == "fine_labels"
    assert len(DATASETS["fashion-mnist"].remotes[0].urls) == 2  # primary and mirror


def test_lookup_order(tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, env, debian = tmp_path / "dd", tmp_path / "env", tmp_path / "debian"
    write_mnist_like(data_dir / "fashion-mnist", 1)
    write_mnist_like(env / "fashion-mnist", 2)
    write_mnist_like(debian, 3)  # the Debian folder holds the files directly
    write_mnist_like(isolated / "fashion-mnist", 4)
    monkeypatch.setenv("LABELDP_DATA", str(env))
    monkeypatch.setattr(sources, "DEBIAN_DIRS", {"fashion-mnist": debian})
    assert search_roots("fashion-mnist", data_dir) == [data_dir, env, debian, isolated]
    assert search_roots("mnist", data_dir) == [data_dir, env, isolated]

    assert locate("fashion-mnist", data_dir) == data_dir / "fashion-mnist"
    assert locate("fashion-mnist") == env / "fashion-mnist"
    monkeypatch.delenv("LABELDP_DATA")
    assert locate("fashion-mnist") == debian
    monkeypatch.setattr(sources, "DEBIAN_DIRS", {})
    assert locate("fashion-mnist") == isolated / "fashion-mnist"
    train, _ = load_splits("fashion-mnist", download=False)
    assert int(train.images.max()) == 4


def test_data_dir_holding_files_directly(tmp_path: Path) -> None:
    folder = write_mnist_like(tmp_path / "raw", 7, gz=False)
    assert locate("mnist", folder) == folder
    train, test = load_splits("mnist", data_dir=folder, download=False)
    assert train.images.shape == (6, 1, 28, 28) and len(test) == 3
    assert int(train.images.min()) == 7


def test_incomplete_folder_is_skipped_and_reported(tmp_path: Path, isolated: Path) -> None:
    write_mnist_like(tmp_path / "dd" / "mnist", 1)
    (tmp_path / "dd" / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    write_mnist_like(isolated / "mnist", 2)
    assert locate("mnist", tmp_path / "dd") == isolated / "mnist"
    (isolated / "mnist" / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(
        DataError, match="holds only train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images"
    ):
        locate("mnist", tmp_path / "dd")


def test_missing_everywhere_names_every_folder(
    tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LABELDP_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(sources, "DEBIAN_DIRS", {"fashion-mnist": tmp_path / "deb"})
    with pytest.raises(DataError) as info:
        locate("fashion-mnist", tmp_path / "dd", download=False)
    msg = str(info.value)
    for folder in (
        tmp_path / "dd" / "fashion-mnist",
        tmp_path / "dd",
        tmp_path / "env" / "fashion-mnist",
        tmp_path / "env",
        tmp_path / "deb" / "fashion-mnist",
        tmp_path / "deb",
        isolated / "fashion-mnist",
        isolated,
    ):
        assert f"{folder}," in msg or f"{folder};" in msg
    assert "'fashion-mnist'" in msg and "train-images-idx3-ubyte[.gz]" in msg
    assert "labeldp data fetch fashion-mnist" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert "\n" not in msg


# --- CIFAR archives --------------------------------------------------------------------


def test_cifar_archive_extracted_and_loaded(tmp_path: Path) -> None:
    archive = cifar10_tar(tmp_path / "dd" / "cifar-10-python.tar.gz")
    folder = locate("cifar10", tmp_path / "dd")
    assert folder == tmp_path / "dd" / "cifar10" / "cifar-10-batches-py"
    assert archive.exists()
    assert [p.name for p in (tmp_path / "dd" / "cifar10").iterdir()] == ["cifar-10-batches-py"]
    train, test = load_splits("cifar10", data_dir=tmp_path / "dd", download=False)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.images[:4].max() == 0 and train.images[16:].min() == 4  # batch order kept
    assert int(test.images.min()) == 5
    archive.unlink()  # the extracted folder is found on its own afterwards
    assert locate("cifar10", tmp_path / "dd") == folder


def test_cifar_extracted_folder_anywhere_in_root(tmp_path: Path) -> None:
    cifar10_tar(tmp_path / "a.tar.gz")
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        tar.extractall(tmp_path / "dd", filter="data")
    batches = tmp_path / "dd" / "cifar-10-batches-py"
    assert locate("cifar10", tmp_path / "dd") == batches
    assert locate("cifar10", batches) == batches  # --data-dir straight at the batches


def test_cifar_incomplete_extraction_replaced(tmp_path: Path) -> None:
    stale = tmp_path / "dd" / "cifar10" / "cifar-10-batches-py"
    stale.mkdir(parents=True)
    (stale / "data_batch_1").write_bytes(b"partial")
    cifar10_tar(tmp_path / "dd" / "cifar10" / "cifar-10-python.tar.gz")
    assert locate("cifar10", tmp_path / "dd") == stale
    assert len(list(stale.iterdir())) == 7
    leftovers = [p.name for p in (tmp_path / "dd" / "cifar10").iterdir()]
    assert sorted(leftovers) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


@pytest.mark.parametrize("bad", ["../evil", "/tmp/labeldp-evil-abs", "cifar-10-batches-py/../../x"])
def test_unsafe_tar_member_refused(tmp_path: Path, bad: str) -> None:
    dd = tmp_path / "deep" / "dd"
    cifar10_tar(dd / "cifar-10-python.tar.gz", extra={bad: b"owned"})
    with pytest.raises(DataError, match="refusing to extract .*absolute path or '..'"):
        locate("cifar10", dd)
    assert not (tmp_path / "deep" / "evil").exists() and not (tmp_path / "deep" / "x").exists()
    assert not Path("/tmp/labeldp-evil-abs").exists()
    assert list((dd / "cifar10").iterdir()) == []  # no half-extracted folder left


def test_tar_link_refused(tmp_path: Path) -> None:
    path = cifar10_tar(tmp_path / "dd" / "cifar-10-python.tar.gz")
    with tarfile.open(path, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w:gz") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
        link = tarfile.TarInfo("cifar-10-batches-py/passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(DataError, match="link or special file"):
        locate("cifar10", tmp_path / "dd")


def test_corrupt_archive(tmp_path: Path) -> None:
    path = cifar10_tar(tmp_path / "dd" / "cifar-10-python.tar.gz")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match=r"not a valid \.tar\.gz archive.*labeldp data fetch"):
        locate("cifar10", tmp_path / "dd")


# --- downloads from a local HTTP server ------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """(base URL, folder it serves) of an HTTP server on 127.0.0.1."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def served_fashion(
    server: tuple[str, Path], primary: str = "primary/", bad_md5: bool = False
) -> sources.DatasetInfo:
    """FASHION with its files served under mirror/ and URLs primary/ then mirror/."""
    base, served = server
    write_mnist_like(served / "mirror", 9)
    remotes = tuple(
        Remote(
            r.filename,
            "0" * 32 if bad_md5 else md5(served / "mirror" / r.filename),
            (f"{base}/{primary}{r.filename}", f"{base}/mirror/{r.filename}"),
        )
        for r in FASHION.remotes
    )
    return dataclasses.replace(FASHION, remotes=remotes)


def test_download_good_md5(server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = server
    (served / "f.bin").write_bytes(b"x" * 5000)
    dest = tmp_path / "out" / "f.bin"
    assert download(f"{base}/f.bin", dest, md5(served / "f.bin")) == dest
    assert dest.read_bytes() == b"x" * 5000
    assert [p.name for p in dest.parent.iterdir()] == ["f.bin"]


def test_download_bad_md5_leaves_nothing(server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = server
    (served / "f.bin").write_bytes(b"payload")
    dest = tmp_path / "out" / "f.bin"
    with pytest.raises(DataError) as info:
        download(f"{base}/f.bin", dest, "0123456789abcdef0123456789abcdef")
    msg = str(info.value)
    assert f"{base}/f.bin" in msg and "0123456789abcdef0123456789abcdef" in msg
    assert md5(served / "f.bin") in msg
    assert list(dest.parent.iterdir()) == []


def test_download_404(server: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = server
    with pytest.raises(DataError, match=f"could not download {base}/nope: HTTP 404"):
        download(f"{base}/nope", tmp_path / "nope", "0" * 32)
    assert not (tmp_path / "nope").exists()


def test_fetch_falls_back_to_mirror(server: tuple[str, Path], tmp_path: Path) -> None:
    info = served_fashion(server)  # primary/ is not served: every primary URL 404s
    folder = fetch(info, tmp_path / "dd")
    assert folder == tmp_path / "dd" / "fashion-mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(r.filename for r in info.remotes)
    train, test = load_splits(info, data_dir=tmp_path / "dd", download=False)
    assert len(train) == 6 and len(test) == 3 and int(train.images.min()) == 9


def test_fetch_primary_first(
    server: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = served_fashion(server, primary="mirror/")
    tried: list[str] = []
    real = sources.download
    monkeypatch.setattr(
        sources, "download", lambda url, dest, md5: (tried.append(url), real(url, dest, md5))[1]
    )
    fetch(info, tmp_path / "dd")
    assert tried == [r.urls[0] for r in info.remotes]
    tried.clear()
    fetch(info, tmp_path / "dd")  # already there: no download
    assert tried == []


def test_fetch_bad_md5(server: tuple[str, Path], tmp_path: Path) -> None:
    info = served_fashion(server, bad_md5=True)
    with pytest.raises(DataError) as err:
        fetch(info, tmp_path / "dd")
    msg = str(err.value)
    assert "checksum mismatch" in msg and info.remotes[0].urls[1] in msg and "0" * 32 in msg
    assert "HTTP 404" in msg and info.remotes[0].urls[0] in msg
    assert "labeldp data fetch fashion-mnist" in msg
    assert list((tmp_path / "dd" / "fashion-mnist").iterdir()) == []


def test_download_goes_to_env_then_cache(
    server: tuple[str, Path], tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = served_fashion(server)
    assert fetch(info) == isolated / "fashion-mnist"
    monkeypatch.setenv("LABELDP_DATA", str(tmp_path / "env"))
    # the cache copy is found, so nothing is downloaded into $LABELDP_DATA
    assert locate(info, download=True) == isolated / "fashion-mnist"
    (isolated / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    assert fetch(info) == tmp_path / "env" / "fashion-mnist"


def test_download_cifar_archive(server: tuple[str, Path], tmp_path: Path) -> None:
    base, served = server
    archive = cifar10_tar(served / "cifar-10-python.tar.gz")
    info = dataclasses.replace(
        CIFAR10, remotes=(Remote(archive.name, md5(archive), (f"{base}/{archive.name}",)),)
    )
    train, test = load_splits(info, data_dir=tmp_path / "dd")
    assert len(train) == 20 and len(test) == 4
    assert (tmp_path / "dd" / "cifar10" / "cifar-10-python.tar.gz").exists()


def test_download_unreachable(tmp_path: Path) -> None:
    info = dataclasses.replace(
        FASHION,
        remotes=tuple(
            Remote(r.filename, r.md5, ("http://127.0.0.1:9/x.gz",)) for r in FASHION.remotes
        ),
    )
    with pytest.raises(DataError, match=r"not found: .*could not download http://127\.0\.0\.1:9"):
        load_splits(info, data_dir=tmp_path / "dd")
