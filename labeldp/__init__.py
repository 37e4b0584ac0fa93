"""labeldp: a toolkit for research on label differential privacy.

Features are public, labels are private. The package holds the label mechanisms,
a training core that runs on CPU or CUDA, the privacy ledger, and the experiment
tooling; see docs/ARCHITECTURE.md for the map.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("labeldp")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
