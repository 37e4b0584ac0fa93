"""The dataset layer: file formats, where datasets come from, and on-device datasets.

Typical use::

    from labeldp.data import load_splits, random_subset
    train, test = load_splits("fashion-mnist", device="cuda")
    train = train.subset(random_subset(len(train), 1000, seed=0))
"""

from labeldp.data.dataset import (
    DeviceDataset,
    hold_out,
    load_splits,
    random_partition,
    random_subset,
)
from labeldp.data.formats import read_cifar_batch, read_idx
from labeldp.data.sources import (
    DATASETS,
    DEBIAN_DIRS,
    DatasetInfo,
    Remote,
    cache_dir,
    download,
    fetch,
    get_info,
    locate,
    search_roots,
)

__all__ = [
    "DATASETS",
    "DEBIAN_DIRS",
    "DatasetInfo",
    "DeviceDataset",
    "Remote",
    "cache_dir",
    "download",
    "fetch",
    "get_info",
    "hold_out",
    "load_splits",
    "locate",
    "random_partition",
    "random_subset",
    "read_cifar_batch",
    "read_idx",
    "search_roots",
]
