"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import isolate_data_sources, write_learnable_fashion


@pytest.fixture
def data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Path:
    """A small learnable Fashion-MNIST (fakes.write_learnable_fashion) in a temporary
    folder, with every real data source hidden. Its size: the module's or test's
    ``pytest.mark.fake_fashion(n_train=…, n_test=…)``, else the writer's defaults."""
    isolate_data_sources(monkeypatch, tmp_path)
    marker = request.node.get_closest_marker("fake_fashion")
    return write_learnable_fashion(tmp_path / "data", **(marker.kwargs if marker else {}))
