"""``pyvmm remote --api-socket PATH COMMAND``: the control API's client (as Cloud
Hypervisor's ``ch-remote``), on the standard library's HTTP/1.1 client over a Unix
socket — no aiohttp, so it starts fast.

Exit codes (docs/api.md): 0 done; 2 bad usage; 4 the API cannot be reached (no
socket at the path, nobody listening, not an HTTP answer); 5 the VM refused (an
error status, e.g. 409 pausing a paused VM). One line on stderr for each failure.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import urllib.parse
from collections.abc import Sequence
from typing import Any, TextIO

from pyvmm.api import COMMANDS

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_UNREACHABLE = 4
EXIT_REFUSED = 5
TIMEOUT_S = 30.0

class ApiUnreachable(Exception):
    pass


class ApiRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except BaseException:
            s.close()
            raise
        self.sock = s


def request(path: str, method: str, url: str, timeout: float = TIMEOUT_S,
            body: dict[str, Any] | None = None) -> Any:
    """The JSON answer of ``method url`` on the socket at ``path``."""
    conn = _UnixConnection(path, timeout)
    payload = json.dumps(body).encode() if body is not None else (
        b"" if method == "PUT" else None)
    try:
        try:
            conn.request(method, url, body=payload,
                         headers={"Accept": "application/json",
                                  "Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except FileNotFoundError:
            raise ApiUnreachable(f"no API socket at {path}") from None
        except ConnectionRefusedError:
            raise ApiUnreachable(f"nothing listens on {path} (the VM has stopped?)") from None
        except (OSError, http.client.HTTPException) as e:
            raise ApiUnreachable(f"cannot talk to {path}: "
                                 f"{getattr(e, 'strerror', None) or e!r}") from None
    finally:
        conn.close()
    try:
        body = json.loads(data) if data else None
    except ValueError:
        raise ApiUnreachable(f"{path}: the answer is not JSON (not a pyvmm API?)") from None
    if resp.status >= 400:
        msg = body.get("error") if isinstance(body, dict) else None
        raise ApiRefused(resp.status, f"{msg or resp.reason} (HTTP {resp.status})")
    return body


# --- readable output -------------------------------------------------------------------------
def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def format_state(d: dict[str, Any]) -> str:
    cfg = d.get("config", {})
    lines = [f"state: {d['state']}" + (" (stopping)" if d.get("stopping") else ""),
             f"uptime: {d['uptime_s']:.1f} s", f"pid: {d['pid']}",
             f"kernel: {cfg.get('kernel')}", f"memory: {cfg.get('memory')}",
             f"devices: {', '.join(x['type'] for x in cfg.get('devices', [])) or 'none'}"]
    r = d.get("result")
    if r:
        lines.append(f"result: {r['reason']} (exit code {r['exit_code']}): {r['message']}")
    return "\n".join(lines)


def format_devices(d: dict[str, Any]) -> str:
    rows = [("name", "type", "mode", "exits", "ranges", "counters")]
    for x in d["devices"]:
        ranges = " ".join(f"{r['bus']}:{r['base']:#x}" for r in x["ranges"])
        ctr = ", ".join(f"{k}={v:g}" for k, v in sorted(x["counters"].items()) if v)
        rows.append((x["name"], x["type"], x["mode"], str(x["exits"]), ranges, ctr))
    return _table(rows)


def format_counters(d: dict[str, Any]) -> str:
    out = [f"uptime: {d['uptime_s']:.1f} s",
           "exits: " + ", ".join(f"{k} {v}" for k, v in d["exits"].items())]
    rows = [("device", "reads", "writes")]
    rows += [(x["name"], str(x["reads"]), str(x["writes"])) for x in d["devices"]
             if x["reads"] or x["writes"]]
    out += ["", _table(rows), ""]
    irq = [("route", "gsi", "vector", "source", "count")]
    irq += [(i["route"], "" if i["gsi"] is None else str(i["gsi"]),
             "" if i["vector"] is None else f"{i['vector']:#x}", i["source"] or "",
             str(i["count"])) for i in d["interrupts"]]
    out.append(_table(irq))
    out.append("msi: " + ", ".join(f"{k} {v}" for k, v in d["msi"].items()))
    return "\n".join(out)


def format_map(d: dict[str, Any]) -> str:
    rows = [("name", "bus", "base", "size", "reads", "writes")]
    for bus in ("pio", "mmio"):
        rows += [(r["name"], bus, f"{r['base']:#x}", f"{r['size']:#x}", str(r["reads"]),
                  str(r["writes"])) for r in d[bus]]
    return _table(rows)


def format_pci(d: dict[str, Any]) -> str:
    return "\n".join(f["line"] for f in d["functions"])


def format_action(d: dict[str, Any]) -> str:
    return (f"state: {d['state']}" + (" (stopping)" if d.get("stopping") else "")
            + ("" if d.get("parked", True) else " (the vCPU has not parked yet)"))


def format_trace(d: dict[str, Any]) -> str:
    from pyvmm.api.models import TraceEntry
    from pyvmm.api.trace import format_entry

    head = f"trace of {d['device']}: {'on' if d['enabled'] else 'off'}, " \
        f"{len(d['entries'])} of {d['depth']} entries"
    return "\n".join([head, *(f"{e['t_s']:12.6f}  " + format_entry(d["device"],
                                                                  TraceEntry(**e))
                             for e in d["entries"])])


FORMATS = {"trace": format_trace, "trace-on": format_trace, "trace-off": format_trace,
           "state": format_state, "devices": format_devices, "counters": format_counters,
           "map": format_map, "pci": format_pci}


def run(path: str, command: str, as_json: bool, out: TextIO = sys.stdout,
        err: TextIO = sys.stderr, device: str | None = None) -> int:
    method, url = COMMANDS[command]
    payload = None
    if "{name}" in url:
        if not device:
            print(f"pyvmm remote: error: {command} needs a DEVICE (see 'pyvmm remote "
                  "devices')", file=err)
            return EXIT_USAGE
        url = url.replace("{name}", urllib.parse.quote(device, safe=""))
        if command != "trace":
            payload = {"enabled": command == "trace-on"}
    elif device:
        print(f"pyvmm remote: error: {command} takes no DEVICE", file=err)
        return EXIT_USAGE
    try:
        body = request(path, method, url, body=payload)
    except ApiUnreachable as e:
        print(f"pyvmm remote: error: {e}", file=err)
        return EXIT_UNREACHABLE
    except ApiRefused as e:
        print(f"pyvmm remote: {command} refused: {e}", file=err)
        return EXIT_REFUSED
    if as_json:
        print(json.dumps(body, indent=2), file=out)
        return EXIT_OK
    try:
        text = FORMATS.get(command, format_action)(body)
    except (KeyError, TypeError, ValueError, AttributeError):
        print(f"pyvmm remote: error: {path}: an answer pyvmm does not understand (try "
              "--json)", file=err)
        return EXIT_UNREACHABLE
    print(text, file=out)
    return EXIT_OK
