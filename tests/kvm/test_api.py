"""The control API against a running tiny guest (``pyvmm run --api-socket``): every
endpoint answers as the OpenAPI document says, counters increase while the guest
loops, a pause really stops the vCPU (the guest's own exit counter does not move
while paused and moves again after resume), the remote client, /metrics parsed by
prometheus_client's parser, the event stream, and the socket gone after the VM stops.

No timing is asserted: waits are for a state or a change, with generous deadlines."""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyvmm.api.openapi import openapi_document
from tests.conftest import pyvmm_cmd, wait_for_path

LOOP = "iters=1000000000000"  # pio-loop: an UART scratch write per iteration, for ever


class Unix(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=60)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(self.unix_path)


def call(sock: Path, method: str, url: str) -> tuple[int, Any, str]:
    c = Unix(sock)
    try:
        c.request(method, url, body=b"" if method == "PUT" else None)
        r = c.getresponse()
        data = r.read().decode()
        ctype = r.getheader("Content-Type", "")
        return r.status, json.loads(data) if ctype.startswith("application/json") else data, \
            ctype
    finally:
        c.close()


def get(sock: Path, url: str) -> Any:
    status, body, _ = call(sock, "GET", url)
    assert status == 200, body
    return body


DOC = openapi_document()


def check(body: Any, model: str) -> None:
    """``body`` is what the OpenAPI document says ``model`` is."""
    jsonschema.validate(body, {"$ref": f"#/components/schemas/{model}",
                               "components": DOC["components"]})


def wait_until(what: str, fn: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.05)


def serial_writes(sock: Path) -> int:
    c = get(sock, "/api/v1/vm.counters")
    return next(d["writes"] for d in c["devices"] if d["name"] == "serial0")


def start(guests: Path, sock: Path, guest: str = "pio_loop", *extra: str
          ) -> subprocess.Popen[str]:
    p = subprocess.Popen(pyvmm_cmd("run", "--kernel", str(guests / f"{guest}.elf"),
                                   "--serial", "none", "--api-socket", str(sock),
                                   "--timeout", "900", *extra),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait_for_path(sock, 120):
        p.kill()
        raise AssertionError(f"no API socket: {p.communicate()[1]}")
    return p


@pytest.fixture(scope="module")
def vm(guests: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A pio-loop guest with a rate-limited virtio-rng beside it, and its API socket."""
    sock = tmp_path_factory.mktemp("api") / "api.sock"
    p = start(guests, sock, "pio_loop", "--cmdline", LOOP, "--rng", "rate=4096")
    try:
        wait_until("the guest writes", lambda: serial_writes(sock) > 0)
        yield sock
    finally:
        if p.poll() is None:
            p.terminate()
        p.communicate(timeout=60)


def remote(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pyvmm_cmd("remote", "--api-socket", str(sock), *args),
                          capture_output=True, text=True, timeout=120)


def test_state_config_and_uptime(vm: Path) -> None:
    body = get(vm, "/api/v1/vm")
    check(body, "VmInfo")
    assert body["state"] == "running" and body["result"] is None and not body["stopping"]
    assert body["config"]["kernel"].endswith("pio_loop.elf")
    assert body["config"]["api_socket"] == str(vm)
    assert body["config"]["devices"] == [{"type": "virtio-rng", "transport": "pci",
                                          "rate": 4096}]
    later = get(vm, "/api/v1/vm")
    assert later["uptime_s"] >= body["uptime_s"] > 0


def test_counters_increase_while_the_guest_loops(vm: Path) -> None:
    first = get(vm, "/api/v1/vm.counters")
    check(first, "Counters")
    n = serial_writes(vm)
    wait_until("serial0 writes increase", lambda: serial_writes(vm) > n)
    second = get(vm, "/api/v1/vm.counters")
    assert second["exits"]["io"] > first["exits"]["io"]
    # Interrupts by GSI with their route: the board's lines on KVM's irqchip.
    routes = {(i["route"], i["gsi"], i["source"]) for i in second["interrupts"]}
    assert ("KVM_IRQ_LINE", 4, "serial0") in routes
    # The virtio-rng's INTx pin, named by its instance (not its transport).
    assert any(r == "KVM_IRQ_LINE" and s == "virtio-rng0" for r, _, s in routes)


def test_devices_with_mode_config_and_counters(vm: Path) -> None:
    body = get(vm, "/api/v1/devices")
    check(body, "DeviceList")
    devs = {d["name"]: d for d in body["devices"]}
    serial = devs["serial0"]
    assert (serial["type"], serial["mode"]) == ("board", "emulated")
    assert serial["exits"] > 0 and serial["ranges"][0]["base"] == 0x3F8
    rng = devs["virtio-rng0"]
    assert (rng["type"], rng["kind"], rng["mode"]) == ("virtio-rng", "virtio", "paravirtual")
    assert rng["config"] == {"transport": "pci", "rate": 4096}
    assert {"requests", "bytes", "notifications", "throttled"} <= set(rng["counters"])
    assert any(r["name"].startswith("virtio-pci-rng.bar") for r in rng["ranges"])


def test_map_and_pci_tree(vm: Path) -> None:
    m = get(vm, "/api/v1/vm.map")
    check(m, "MachineMap")
    assert any(e["name"] == "serial0" and e["base"] == 0x3F8 for e in m["map"])
    assert any(r["name"] == "serial0" and r["writes"] > 0 for r in m["pio"])
    pci = get(vm, "/api/v1/pci")
    check(pci, "PciTree")
    bdfs = {f["bdf"]: f for f in pci["functions"]}
    assert bdfs["00:00.0"]["name"] == "host-bridge"
    assert bdfs["00:02.0"]["vendor_id"] == 0x1AF4  # the virtio-rng, after the test device
    info = subprocess.run(pyvmm_cmd("info", "--machine"), capture_output=True, text=True,
                          check=True).stdout
    # The functions `pyvmm info` prints (no configured devices there) are the VM's.
    for line in (f["line"] for f in pci["functions"][:2]):
        assert line in info


def test_pause_really_stops_the_vcpu(vm: Path) -> None:
    status, body, _ = call(vm, "PUT", "/api/v1/vm.pause")
    assert status == 200 and body["state"] == "paused" and body["parked"]
    check(body, "VmAction")
    try:
        assert get(vm, "/api/v1/vm")["state"] == "paused"
        a = serial_writes(vm)
        time.sleep(1.0)  # room for the guest to run, were it not paused
        b = serial_writes(vm)
        assert a == b, "the guest's exit counter advanced while paused"
        status, again, _ = call(vm, "PUT", "/api/v1/vm.pause")
        assert status == 409 and "in state paused" in again["error"]
    finally:
        status, body, _ = call(vm, "PUT", "/api/v1/vm.resume")
    assert status == 200 and body["state"] == "running"
    wait_until("the guest runs again", lambda: serial_writes(vm) > b)
    status, again, _ = call(vm, "PUT", "/api/v1/vm.resume")
    assert status == 409 and "needs paused" in again["error"]
    status, reset, _ = call(vm, "PUT", "/api/v1/vm.reset")
    assert status == 501 and "not supported" in reset["error"]


def test_event_stream_sends_totals_then_deltas(vm: Path) -> None:
    c = Unix(vm)
    try:
        c.request("GET", "/api/v1/events")
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Content-Type", "").startswith(
            "text/event-stream")
        events: list[tuple[str, dict[str, Any]]] = []
        name = ""
        while len(events) < 3:
            line = r.fp.readline().decode()
            assert line, "the stream ended"
            if line.startswith("event: "):
                name = line[7:].strip()
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    finally:
        c.close()
    assert events[0][0] == "totals" and events[0][1]["totals"]["device.serial0"] > 0
    for kind, data in events[1:]:
        assert kind == "delta" and data["state"] == "running"
        assert data["delta"]["device.serial0"] > 0  # the guest loops: its device moved


def put_json(sock: Path, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    c = Unix(sock)
    try:
        c.request("PUT", url, body=json.dumps(body).encode(),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def test_register_trace_of_the_looping_guest(vm: Path) -> None:
    """pio-loop writes i & 0xff to the UART's scratch register: the trace names it SCR,
    on vCPU 0, with consecutive values; off, the ring stops and the guest runs on."""
    url = "/api/v1/devices/serial0/trace"
    status, body = put_json(vm, url, {"enabled": True, "depth": 64})
    assert status == 200 and body["enabled"] and body["depth"] == 64
    wait_until("64 traced accesses", lambda: len(get(vm, url)["entries"]) == 64)
    trace = get(vm, url)
    check(trace, "Trace")
    entries = trace["entries"]
    assert {(e["register"], e["access"], e["offset"], e["vcpu"], e["range"])
            for e in entries} == {("SCR", "write", 7, 0, "serial0")}
    values = [e["value"] for e in entries]
    assert all((b - a) & 0xFF == 1 for a, b in itertools.pairwise(values))
    status, body = put_json(vm, url, {"enabled": False})
    assert status == 200 and not body["enabled"]
    last = get(vm, url)["entries"]
    n = serial_writes(vm)
    wait_until("the guest runs on untraced", lambda: serial_writes(vm) > n)
    assert get(vm, url)["entries"] == last
    assert put_json(vm, "/api/v1/devices/nope/trace", {"enabled": True})[0] == 404
    assert put_json(vm, url, {"enabled": "yes"})[0] == 400


def test_metrics_parse_and_count(vm: Path) -> None:
    status, text, ctype = call(vm, "GET", "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    writes = [s.value for s in fams["pyvmm_device_exits"].samples
              if s.labels["device"] == "serial0" and s.labels["access"] == "write"]
    assert writes and writes[0] > 0
    scr = [s.value for s in fams["pyvmm_register_accesses"].samples
           if s.labels["device"] == "serial0" and s.labels["offset"] == "0x7"
           and s.labels["access"] == "write" and s.labels["size"] == "1"]
    assert scr and scr[0] > 0  # pio-loop's writes, at the scratch register
    io = [s.value for s in fams["pyvmm_exits"].samples if s.labels.get("kind") == "io"]
    assert io and io[0] >= writes[0]
    irq = {(s.labels["route"], s.labels["gsi"]) for s in fams["pyvmm_interrupts"].samples}
    assert ("KVM_IRQ_LINE", "4") in irq
    for fam in ("pyvmm_virtio_requests", "pyvmm_ratelimit_throttled"):
        assert [s.labels["device"] for s in fams[fam].samples] == ["virtio-rng0"]
    state = {s.labels["state"]: s.value for s in fams["pyvmm_vm_state"].samples}
    assert state["running"] == 1.0 and state["paused"] == 0.0
    # Samples are unique (a range named twice, like the i8042's, is told apart by base).
    keys = [(s.name, tuple(sorted(s.labels.items()))) for f in fams.values() for s in f.samples]
    assert len(keys) == len(set(keys))


def test_remote_client_output(vm: Path) -> None:
    r = remote(vm, "state")
    assert r.returncode == 0 and r.stdout.startswith("state: running\n")
    assert "devices: virtio-rng" in r.stdout
    r = remote(vm, "devices")
    rows = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines()[1:]}
    assert r.returncode == 0 and rows["serial0"][1:3] == ["board", "emulated"]
    assert rows["virtio-rng0"][1:3] == ["virtio-rng", "paravirtual"]
    r = remote(vm, "counters")
    assert r.returncode == 0 and "exits: " in r.stdout and "serial0" in r.stdout
    r = remote(vm, "map")
    assert r.returncode == 0 and any(ln.split()[:3] == ["serial0", "pio", "0x3f8"]
                                     for ln in r.stdout.splitlines())
    r = remote(vm, "pci")
    assert r.returncode == 0 and r.stdout.startswith("pci 00:00.0 ")
    for cmd in ("state", "devices", "counters", "map", "pci"):
        r = remote(vm, "--json", cmd)
        assert r.returncode == 0, r.stderr
        json.loads(r.stdout)
    r = remote(vm, "trace-on", "serial0")
    assert r.returncode == 0 and r.stdout.startswith("trace of serial0: on, ")
    wait_until("traced", lambda: len(get(vm, "/api/v1/devices/serial0/trace")["entries"]) > 2)
    r = remote(vm, "trace-off", "serial0")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0].startswith("trace of serial0: off, ")
    assert lines[1].split()[1:5] == ["serial0", "SCR", "write", lines[1].split()[4]]
    assert lines[1].endswith("(scratch)")
    assert remote(vm, "pause").stdout == "state: paused\n"
    r = remote(vm, "pause")
    assert r.returncode == 5 and r.stderr.count("\n") == 1 and "HTTP 409" in r.stderr
    assert remote(vm, "resume").stdout == "state: running\n"


def test_stop_ends_the_run_and_removes_the_socket(guests: Path, tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    p = start(guests, sock, "pio_loop", "--cmdline", LOOP)
    try:
        wait_until("running", lambda: get(sock, "/api/v1/vm")["state"] == "running")
        r = remote(sock, "stop")
        assert r.returncode == 0 and r.stdout.startswith("state: "), r.stderr
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0
    assert "VM stopped: stopped through the control API (exit code 0" in err
    assert not sock.exists()
    r = remote(sock, "state")
    assert r.returncode == 4 and r.stderr.count("\n") == 1


def test_a_guest_that_ends_by_itself_takes_the_socket_along(guests: Path,
                                                            tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    r = subprocess.run(pyvmm_cmd("run", "--kernel", str(guests / "hello.elf"), "-q",
                                 "--serial", "none", "--api-socket", str(sock),
                                 "--timeout", "300"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert not sock.exists()


def test_sigterm_ends_the_run_and_removes_the_socket(guests: Path, tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    p = start(guests, sock, "pio_loop", "--cmdline", LOOP)
    try:
        wait_until("running", lambda: get(sock, "/api/v1/vm")["state"] == "running")
        p.terminate()
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 143 and "SIGTERM" in err
    assert not sock.exists()
