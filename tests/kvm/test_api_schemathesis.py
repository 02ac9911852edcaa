"""Schemathesis against the served OpenAPI document (the committed one is the same,
tests/unit/test_api.py): requests generated from the schema, positive and negative,
sent to a running tiny guest's API socket; no answer is a 5xx, every answer's status,
content type and body are the ones the document declares (vm.reset's documented
501 aside: pyvmm cannot reset a machine in place). Bounded: a few examples
per operation, no time limit per example (CI is a loaded 2-core machine).

``vm.stop`` (it would end the VM under the other operations) and the endless event
stream are left out; both have their own tests in test_api.py."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from requests.adapters import HTTPAdapter
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from pyvmm.api.openapi import openapi_document
from tests.conftest import pyvmm_cmd, wait_for_path

schema = schemathesis.openapi.from_dict(openapi_document())
schema = schema.exclude(path="/api/v1/vm.stop").exclude(path="/api/v1/events")


class _UnixConnection(HTTPConnection):
    def __init__(self, path: str, **kw: Any) -> None:
        super().__init__("localhost", **kw)
        self.unix_path = path

    def _new_conn(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(60)
        s.connect(self.unix_path)
        return s


class _UnixPool(HTTPConnectionPool):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=60)
        self.unix_path = path

    def _new_conn(self) -> HTTPConnection:
        return _UnixConnection(self.unix_path, timeout=60)


class UnixAdapter(HTTPAdapter):
    """requests over the API's Unix socket (http://localhost/... goes to ``path``)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.pool = _UnixPool(path)

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None,
                                        cert: Any = None) -> HTTPConnectionPool:
        return self.pool

    def get_connection(self, url: Any, proxies: Any = None) -> HTTPConnectionPool:
        return self.pool

    def close(self) -> None:
        self.pool.close()
        super().close()


@pytest.fixture(scope="module")
def session(guests: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        requests.Session]:
    sock = tmp_path_factory.mktemp("fuzz") / "api.sock"
    p = subprocess.Popen(pyvmm_cmd("run", "--kernel", str(guests / "pio_loop.elf"),
                                   "--cmdline", "iters=1000000000000", "--serial", "none",
                                   "--rng", "rate=4096", "--api-socket", str(sock), "-q",
                                   "--timeout", "900"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    s = requests.Session()
    try:
        assert wait_for_path(sock, 120), "no API socket"
        s.mount("http://localhost", UnixAdapter(str(sock)))
        yield s
        assert p.poll() is None, "the VM ended under the fuzzing"
    finally:
        s.close()
        if p.poll() is None:
            p.terminate()
        p.communicate(timeout=60)


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_5xx_and_answers_match_the_document(case: schemathesis.Case,
                                               session: requests.Session) -> None:
    response = case.call(base_url="http://localhost", session=session)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    if case.path == "/api/v1/vm.reset":
        # The one documented 5xx: 501, pyvmm cannot reset a machine in place. Its
        # status, content type and body are still held to the document.
        assert response.status_code in (400, 405, 413, 501)  # 405: a method it lacks
        checks.remove(not_a_server_error)
    case.validate_response(response, checks=checks)
