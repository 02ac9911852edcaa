"""The control API without a VM: the OpenAPI document (generated, committed, current,
valid), the server's answers to bad requests (JSON errors with the right status,
never an exception), the event stream dropping a client that does not read while
others go on, the socket claimed and removed as unix_socket.py promises, the typed
config round-tripping through its JSON form, and ``pyvmm remote``'s exit codes."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest

from pyvmm.api import client
from pyvmm.api.openapi import openapi_document
from pyvmm.api.server import MAX_BODY, QUEUE_DEPTH, ApiServer
from pyvmm.api.views import machine_config_json
from pyvmm.errors import ConfigError
from pyvmm.machine.config import MachineConfig, config_schema
from tests.conftest import ROOT, pyvmm_cmd


class Unix(http.client.HTTPConnection):
    def __init__(self, path: str | Path) -> None:
        super().__init__("localhost", timeout=30)
        self.path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


def call(path: Path, method: str, url: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    c = Unix(path)
    try:
        c.request(method, url, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else None
    finally:
        c.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ApiServer, Path]]:
    path = tmp_path / "api.sock"
    s = ApiServer(str(path))
    s.attach(None)  # no VM: what does not need one is served, the rest is 503
    yield s, path
    s.close()


# --- the OpenAPI document --------------------------------------------------------------------
def test_docs_openapi_json_is_current() -> None:
    committed = (ROOT / "docs" / "openapi.json").read_text()
    assert json.loads(committed) == openapi_document(), \
        "docs/openapi.json is stale: run `pyvmm config --openapi > docs/openapi.json`"


def test_openapi_schemas_are_valid_json_schema_and_refs_resolve() -> None:
    doc = openapi_document()
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    for name, s in schemas.items():
        jsonschema.Draft202012Validator.check_schema(s), name
    text = json.dumps(doc)
    for ref in {p.split('"')[0] for p in text.split('"$ref": "')[1:]}:
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    # The config in GET /vm is the config file's schema: the same declarations.
    assert schemas["MachineConfig"]["properties"]["api_socket"] == \
        config_schema()["properties"]["api_socket"]


def test_config_json_round_trips_and_matches_the_schema(tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(b"")
    raw = {"kernel": str(kernel), "memory": "128M", "timeout": 5, "irqchip": "split",
           "api_socket": "x.sock",
           "devices": [{"type": "virtio-rng", "transport": "mmio", "rate": 4096},
                       {"type": "virtio-blk", "path": "d.img", "readonly": True}]}
    cfg = MachineConfig.from_dict(raw)
    out = machine_config_json(cfg)
    jsonschema.validate(out, config_schema())
    again = MachineConfig.from_dict(out)
    assert again == cfg
    assert out["memory"] == "128M" and out["devices"][0]["rate"] == 4096


# --- the server's answers --------------------------------------------------------------------
def test_openapi_is_served(server: tuple[ApiServer, Path]) -> None:
    status, body = call(server[1], "GET", "/api/v1/openapi.json")
    assert status == 200 and body == openapi_document()


@pytest.mark.parametrize("method,url,body,status,text", [
    ("GET", "/nope", None, 404, "no such endpoint"),
    ("GET", "/api/v1/vm.paws", None, 404, "no such endpoint"),
    ("POST", "/api/v1/vm", None, 405, "not allowed"),
    ("GET", "/api/v1/vm.pause", None, 405, "not allowed"),
    ("PUT", "/api/v1/vm.pause", b"{bad", 400, "not valid JSON"),
    ("PUT", "/api/v1/vm.pause", b"[1, 2]", 400, "must be a JSON object"),
    ("PUT", "/api/v1/vm.pause", b'{"force": true}', 400, "takes no parameters"),
    ("PUT", "/api/v1/vm.stop", b"[" * 100000 + b"]" * 100000, 413, "over"),
    ("PUT", "/api/v1/vm.stop", b"x" * (MAX_BODY + 1), 413, "over"),
    ("PUT", "/api/v1/vm.stop", b'"\\ud800"', 400, "must be a JSON object"),
    ("PUT", "/api/v1/vm.reset", None, 501, "not supported"),
    ("PUT", "/api/v1/vm.pause", None, 503, "no VM attached"),
    ("GET", "/api/v1/vm", None, 503, "no VM attached"),
    ("GET", "/api/v1/devices", None, 503, "no VM attached"),
    ("GET", "/metrics", None, 503, "no VM attached"),
    ("GET", "/api/v1/events", None, 503, "no VM attached"),
    ("GET", "/api/v1/devices/serial0/trace", None, 503, "no VM attached"),
    ("PUT", "/api/v1/devices/serial0/trace", b'{"enabled": 1}', 400, "true or false"),
    ("PUT", "/api/v1/devices/serial0/trace", b"{}", 400, "true or false"),
])
def test_bad_requests_are_json_errors(server: tuple[ApiServer, Path], method: str, url: str,
                                      body: bytes | None, status: int, text: str) -> None:
    got, answer = call(server[1], method, url, body)
    assert got == status
    assert isinstance(answer, dict) and set(answer) == {"error"} and text in answer["error"]
    jsonschema.validate(answer, openapi_document()["components"]["schemas"]["Error"])


def test_garbage_on_the_socket_is_answered_and_the_server_goes_on(
        server: tuple[ApiServer, Path]) -> None:
    for junk in (b"\x00\xff" * 100 + b"\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                 b"GET /api/v1/vm HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                 b"PUT /api/v1/vm.stop HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(str(server[1]))
        s.sendall(junk)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        s.close()
        assert reply == b"" or reply.startswith(b"HTTP/1.1 4"), reply[:80]
    assert call(server[1], "GET", "/api/v1/openapi.json")[0] == 200
    # Nothing reached the "internal error" path; aiohttp's complaints are counted.
    assert not [k for k in server[0].errors.counts if k.startswith("api:")]


# --- the socket -------------------------------------------------------------------------------
def test_socket_is_removed_on_close_and_nothing_else_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    s = ApiServer(str(path))
    s.attach(None)
    assert path.is_socket()
    with pytest.raises(ConfigError, match="another process is listening"):
        ApiServer(str(path))  # a second VMM must not take over a live socket
    s.close()
    assert not path.exists()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep\n")
    with pytest.raises(ConfigError, match="not a socket is there"):
        ApiServer(str(precious))
    assert precious.read_text() == "keep\n"


# --- the event stream -------------------------------------------------------------------------
class _BigCounters(ApiServer):
    """A server whose counters change by a lot every tick, so that a client that does
    not read fills its socket, then its queue."""

    def __init__(self, path: str) -> None:
        super().__init__(path, interval=0.01)
        self.tick = 0

    def snapshot(self) -> dict[str, int]:
        self.tick += 1
        return {f"device.counter{i}": self.tick * (i + 1) for i in range(2000)}


def test_a_client_that_does_not_read_is_dropped_and_others_go_on(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    s = _BigCounters(str(path))
    s.attach(SimpleNamespace(state=SimpleNamespace(value="running")))  # type: ignore[arg-type]
    try:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(str(path))
        slow.sendall(b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\n\r\n")  # then never reads
        seen: list[bytes] = []
        done = threading.Event()

        def fast() -> None:
            c = Unix(path)
            c.request("GET", "/api/v1/events")
            r = c.getresponse()
            assert r.status == 200
            assert r.getheader("Content-Type", "").startswith("text/event-stream")
            while not done.is_set():
                line = r.fp.readline()
                if not line:
                    break
                if line.startswith(b"event: "):
                    seen.append(line.strip())
            c.close()

        t = threading.Thread(target=fast, daemon=True)
        t.start()
        deadline = time.monotonic() + 120
        while s.dropped_streams == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for an event, not measuring time
        assert s.dropped_streams == 1
        n = len(seen)
        deadline = time.monotonic() + 60
        while len(seen) < n + QUEUE_DEPTH and time.monotonic() < deadline:
            time.sleep(0.05)
        # The reading client got its totals, then deltas, before and after the drop.
        assert seen[0] == b"event: totals" and len(seen) >= n + QUEUE_DEPTH
        assert set(seen[1:]) == {b"event: delta"}
        done.set()
        slow.close()
    finally:
        s.close()


# --- pyvmm remote ------------------------------------------------------------------------------
def test_remote_exit_codes_and_one_line(tmp_path: Path, server: tuple[ApiServer, Path]) -> None:
    def remote(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(pyvmm_cmd("remote", "--api-socket", str(sock), *args),
                              capture_output=True, text=True, timeout=60)

    r = remote(tmp_path / "absent.sock", "state")
    assert r.returncode == client.EXIT_UNREACHABLE == 4
    assert r.stderr.count("\n") == 1 and "no API socket at" in r.stderr and not r.stdout
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on: a VMM that died
    r = remote(stale, "pause")
    assert r.returncode == 4 and "nothing listens" in r.stderr and r.stderr.count("\n") == 1
    r = remote(server[1], "pause")  # the server answers 503: the VM refuses
    assert r.returncode == client.EXIT_REFUSED == 5
    assert "pause refused: no VM attached (HTTP 503)" in r.stderr and r.stderr.count("\n") == 1
    r = remote(server[1], "reset")
    assert r.returncode == 5 and "HTTP 501" in r.stderr
    r = remote(server[1], "trace")  # needs a DEVICE
    assert r.returncode == 2 and "needs a DEVICE" in r.stderr and r.stderr.count("\n") == 1
    r = remote(server[1], "trace-on", "serial0")
    assert r.returncode == 5 and "HTTP 503" in r.stderr
    r = remote(server[1], "frobnicate")
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_remote_formats_every_answer() -> None:
    """The readable output of each command, from answers shaped as the models say."""
    vm = {"state": "paused", "uptime_s": 3.25, "pid": 7, "stopping": False, "result": None,
          "config": {"kernel": "k.elf", "memory": "64M", "devices": [{"type": "virtio-rng"}]}}
    assert client.format_state(vm).splitlines()[:2] == ["state: paused", "uptime: 3.2 s"]
    assert "devices: virtio-rng" in client.format_state(vm)
    devs = {"devices": [{"name": "serial0", "type": "board", "mode": "emulated", "exits": 9,
                         "ranges": [{"bus": "pio", "base": 0x3F8}],
                         "counters": {"requests": 0, "bytes": 12}}]}
    lines = client.format_devices(devs).splitlines()
    assert lines[0].split() == ["name", "type", "mode", "exits", "ranges", "counters"]
    assert lines[1].split() == ["serial0", "board", "emulated", "9", "pio:0x3f8", "bytes=12"]
    ctr = {"uptime_s": 1.0, "exits": {"io": 5, "intr": 1},
           "devices": [{"name": "serial0", "reads": 2, "writes": 3},
                       {"name": "rtc", "reads": 0, "writes": 0}],
           "interrupts": [{"route": "irqfd", "gsi": 24, "vector": 0x41,
                           "source": "virtio-pci-rng.msix1", "count": 4}],
           "msi": {"sent": 4}}
    text = client.format_counters(ctr)
    assert "exits: io 5, intr 1" in text and "rtc" not in text
    assert any(ln.split() == ["irqfd", "24", "0x41", "virtio-pci-rng.msix1", "4"]
               for ln in text.splitlines())
    assert client.format_action({"state": "running", "stopping": True}) == \
        "state: running (stopping)"
