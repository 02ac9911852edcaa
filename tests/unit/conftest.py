"""Fixtures of the peer-containment tests (issue #17): a vhost-user-blk server on two
sockets, each with its own image, and a vfio-user server exporting virtio-blk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.peer_frontends import VfioSetup, VhostSetup


@pytest.fixture
def vhost(tmp_path: Path) -> Iterator[VhostSetup]:
    s = VhostSetup(tmp_path)
    yield s
    s.server.close()


@pytest.fixture
def vfio(tmp_path: Path) -> Iterator[VfioSetup]:
    s = VfioSetup(tmp_path)
    yield s
    s.server.close()
