"""The control API: HTTP/1.1 on a Unix socket (Firecracker's and Cloud Hypervisor's
convention), served by aiohttp on a thread of its own with its own asyncio loop.

Nothing here runs on the vCPU thread or the VMM's event loop, and nothing takes a
lock they take: reads are ``api/views.py``'s lock-free snapshots, and the control
calls (pause, resume, stop) are ``Machine``'s own, run on an executor thread so a
pause waiting for the vCPU to park never stalls the API's loop. A state error is 409.
Every answer that is not a success is ``{"error": "..."}`` with its status; bad
input — an unknown path or method, a body that is not a JSON object, a body over
``MAX_BODY`` — is a 4xx, never an exception out of the server.

The event stream (``GET /api/v1/events``, server-sent events) is made by one
producer that snapshots the counters every ``interval`` seconds and hands each
client the delta through a queue of ``QUEUE_DEPTH`` entries; a client whose queue is
full — it does not read — is dropped, and the producer never waits for one.

aiohttp is imported only here, and this module only when ``--api-socket`` is given
(start-up without it is unchanged: bench/revs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pyvmm import sandbox
from pyvmm.api import models as M
from pyvmm.api import views
from pyvmm.api.openapi import openapi_document
from pyvmm.api.trace import DeviceTrace, parse_request
from pyvmm.errors import ConfigError, StateError
from pyvmm.ratelimit_log import OnceLog
from pyvmm.unix_socket import close_unix, listen_unix

if TYPE_CHECKING:
    from pyvmm.machine.vm import Machine

log = logging.getLogger("pyvmm.api")

PREFIX = "/api/v1"
_PAGE = Path(__file__).parent / "web" / "index.html"  # the live view (package data)
MAX_BODY = 64 << 10  # a control request is a few bytes; anything larger is refused
QUEUE_DEPTH = 16  # event-stream deltas waiting for one client before it is dropped
MAX_STREAMS = 16  # event-stream clients at once
STOP_EXIT_CODE = 0  # vm.stop is a clean stop asked for by the user (docs/api.md)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(obj: Any, status: int = 200) -> web.Response:
    body = M.to_json(obj) if not isinstance(obj, dict | list) else obj
    return web.Response(text=json.dumps(body), status=status, content_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps({"error": message}), status=status,
                        content_type="application/json", headers=headers)


class _Stream:
    """One event-stream client: its queue and the task serving it."""

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_DEPTH)
        self.task = task
        self.dropped = False


class ApiServer:
    def __init__(self, path: str, *, interval: float = 1.0,
                 tcp: tuple[str, int] | None = None) -> None:
        """Claim ``path`` (and ``web``'s loopback TCP port) now — a ConfigError, one
        line, if something is there — before the VM is built; serve from ``attach``.
        ``tcp`` is the ``web`` option's loopback address."""
        self.path = path
        self.interval = interval
        self.sock, self._inode = listen_unix(path, "api-socket", backlog=64)
        self.web_sock: socket.socket | None = None
        self.web_url: str | None = None
        self._web_hosts: set[str] = set()
        if tcp is not None:
            try:
                self.web_sock = _listen_tcp(*tcp)
            except BaseException:
                close_unix(self.sock, self.path, self._inode)
                raise
            host, port = self.web_sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            self.web_url = f"http://{shown}:{port}/"
            # DNS rebinding: a page of another site that resolves its name to 127.0.0.1
            # must not reach the API; only these Host headers are answered.
            self._web_hosts = {f"{shown}:{port}", f"localhost:{port}"}
        self.machine: Machine | None = None
        self.errors = OnceLog()
        self.streams: set[_Stream] = set()
        self.traces: dict[str, DeviceTrace] = {}
        self.dropped_streams = 0
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._control = threading.Lock()  # one control call at a time
        self._metrics: Any = None  # prometheus registry, made at the first scrape
        self._closed = False
        # aiohttp logs each malformed request with a traceback; a client could fill the
        # log with them. Once per kind, one line, then counted (ratelimit_log).
        self._http_log = logging.getLogger("pyvmm.api.http")
        self._http_log.propagate = False
        self._http_log.handlers = [_OnceHandler(self.errors)]

    # --- lifecycle ---------------------------------------------------------------------
    def attach(self, m: Machine | None) -> Callable[[], None]:
        """Serve ``m`` (None: no VM, for tests of the server alone) until ``close``."""
        self.machine = m
        self._thread = threading.Thread(target=self._serve, name="api", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        return self.close

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._start())
        except Exception as e:  # cannot serve: say so once, the VM runs on without it
            log.warning("control API on %s failed to start: %r", self.path, e)
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        # Listening (the Unix socket, and the loopback web port): from here on the
        # thread needs only its kind's calls (docs/security.md, "Seccomp").
        mode = getattr(getattr(self.machine, "cfg", None), "seccomp", None)
        if mode is not None:  # (a test's stand-in machine has no config)
            sandbox.name_thread("api")
            sandbox.apply("api", mode)
        producer = loop.create_task(self._produce())
        try:
            loop.run_forever()
        finally:
            producer.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(self._shutdown())
            loop.close()

    async def _start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware])
        r = app.router
        r.add_get(f"{PREFIX}/vm", self._vm)
        for action in ("pause", "resume", "stop", "reset"):
            r.add_put(f"{PREFIX}/vm.{action}", self._action(action))
        r.add_get(f"{PREFIX}/vm.map", self._view(views.machine_map))
        r.add_get(f"{PREFIX}/vm.counters", self._view(views.counters))
        r.add_get(f"{PREFIX}/pci", self._view(views.pci_tree))
        r.add_get(f"{PREFIX}/devices", self._view(views.devices))
        r.add_get(PREFIX + "/devices/{name}/trace", self._trace_get)
        r.add_put(PREFIX + "/devices/{name}/trace", self._trace_put)
        r.add_get(f"{PREFIX}/events", self._events)
        r.add_get(f"{PREFIX}/openapi.json", self._openapi)
        r.add_get("/metrics", self._prometheus)
        r.add_get("/", self._page)
        # Screen (PNG) and keyboard/mouse input plug in here once the VGA display and
        # the PS/2 devices exist (docs/api.md, "Not yet here").
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     logger=self._http_log, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.SockSite(self._runner, self.sock)
        await site.start()
        if self.web_sock is not None:
            await web.SockSite(self._runner, self.web_sock).start()
            print(f"pyvmm: web view on {self.web_url}", file=sys.stderr, flush=True)

    async def _shutdown(self) -> None:
        for s in list(self.streams):
            s.task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    def close(self) -> None:
        """Stop serving, take the tracers off the buses, remove the socket (only if it
        is still ours)."""
        if self._closed:
            return
        self._closed = True
        for trace in self.traces.values():
            trace.disable()
        loop, t = self._loop, self._thread
        if loop is not None and t is not None and t.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(loop.stop)
            t.join(10)
        close_unix(self.sock, self.path, self._inode)
        if self.web_sock is not None:
            self.web_sock.close()

    # --- plumbing ----------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests += 1
        if self._web_hosts and isinstance(
                request.transport.get_extra_info("sockname") if request.transport else None,
                tuple) and request.host not in self._web_hosts:
            return _error(403, f"Host {request.host[:100]!r} is not this VM's web address")
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            what = {404: f"no such endpoint: {request.method} {request.path}",
                    405: f"{request.method} is not allowed on {request.path}",
                    413: f"request body over {MAX_BODY} bytes"}.get(e.status, e.reason)
            return _error(e.status, what, headers)
        except StateError as e:
            return _error(409, str(e))
        except ConnectionError:  # the client went away mid-request: nobody to answer
            return _error(400, "connection lost")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a pyvmm bug: contained, logged once per kind
            self.errors.warn(f"api:{type(e).__name__}",
                             f"control API: {request.method} {request.path}: {e!r}")
            return _error(500, f"internal error: {type(e).__name__}")

    def _vm_or_503(self) -> Machine:
        if self.machine is None:
            raise _NoVm()
        return self.machine

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """The request's JSON object ({} when there is no body)."""
        raw = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise web.HTTPBadRequest(reason="the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(reason="the body must be a JSON object")
        return body

    # --- handlers ------------------------------------------------------------------------
    async def _vm(self, request: web.Request) -> web.StreamResponse:
        try:
            return _json(views.vm_info(self._vm_or_503()))
        except _NoVm:
            return _error(503, "no VM attached")

    def _view(self, fn: Callable[[Machine], Any]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            if self.machine is None:
                return _error(503, "no VM attached")
            return _json(fn(self.machine))
        return handler

    def _action(self, action: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            body = await self._body(request)
            if body:
                return _error(400, f"vm.{action} takes no parameters (got "
                              f"{', '.join(sorted(body))[:200]})")
            if action == "reset":
                return _error(501, "vm.reset is not supported: pyvmm cannot reset a "
                              "machine in place (stop it and run it again)")
            m = self.machine
            if m is None:
                return _error(503, "no VM attached")
            loop = asyncio.get_running_loop()
            parked = await loop.run_in_executor(None, self._control_call, m, action)
            return _json(M.VmAction(state=m.state.value, stopping=m.flags.stopping,
                                    parked=parked))
        return handler

    def _control_call(self, m: Machine, action: str) -> bool:
        """On an executor thread: Machine's own lifecycle calls (StateError -> 409)."""
        from pyvmm.machine.vm import VmState

        with self._control:
            if action == "stop":
                if m.state in (VmState.STOPPED,) or m.flags.stopping:
                    raise StateError(m.state.value if not m.flags.stopping else "stopping",
                                     "created/running/paused")
                m.stop("api", STOP_EXIT_CODE, "stopped through the control API")
                return True
            if m.flags.stopping:
                raise StateError("stopping", "running" if action == "pause" else "paused")
            if action == "pause":
                return m.pause()
            m.resume()
            return True

    # --- the register trace --------------------------------------------------------------
    def _trace_of(self, name: str) -> tuple[DeviceTrace, list[Any]] | web.Response:
        m = self.machine
        if m is None:
            return _error(503, "no VM attached")
        ranges = views.device_ranges(m, name)
        if ranges is None:
            return _error(404, f"no device {name[:100]!r} (see GET /api/v1/devices)")
        return self.traces.setdefault(name, DeviceTrace(name)), ranges

    async def _trace_get(self, request: web.Request) -> web.StreamResponse:
        got = self._trace_of(request.match_info["name"])
        if isinstance(got, web.Response):
            return got
        return _json(got[0].snapshot())

    async def _trace_put(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        try:
            enabled, depth = parse_request(body)
        except ValueError as e:
            return _error(400, str(e))
        got = self._trace_of(request.match_info["name"])
        if isinstance(got, web.Response):
            return got
        trace, ranges = got
        m = self.machine
        assert m is not None
        if enabled:
            t0 = m.started_at if m.started_at is not None else time.monotonic()
            trace.enable(ranges, depth, t0, lambda: m.vcpu.thread_id)
        else:
            trace.disable()
        return _json(trace.snapshot())

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=_PAGE.read_bytes(), content_type="text/html",
                            charset="utf-8")

    async def _openapi(self, request: web.Request) -> web.StreamResponse:
        return _json(openapi_document())

    async def _prometheus(self, request: web.Request) -> web.StreamResponse:
        if self.machine is None:
            return _error(503, "no VM attached")
        from pyvmm.api.metrics import CONTENT_TYPE, scrape

        if self._metrics is None:
            from pyvmm.api.metrics import make_registry

            self._metrics = make_registry(self.machine, self)
        body = scrape(self._metrics)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    # --- the event stream --------------------------------------------------------------
    def snapshot(self) -> dict[str, int]:
        """The totals the stream sends deltas of (``views.flat_counters``)."""
        assert self.machine is not None
        return views.flat_counters(views.counters(self.machine))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if self.machine is None:
            return _error(503, "no VM attached")
        if len(self.streams) >= MAX_STREAMS:
            return _error(503, f"at most {MAX_STREAMS} event-stream clients at once")
        task = asyncio.current_task()
        assert task is not None
        client = _Stream(task)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self.streams.add(client)
        try:
            first = {"interval_s": self.interval, "totals": self.snapshot()}
            await resp.write(_sse("totals", first))
            while True:
                item = await client.queue.get()
                if item is None:
                    break
                await resp.write(item)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client went away, was dropped, or the server is closing
        finally:
            self.streams.discard(client)
        return resp

    async def _produce(self) -> None:
        """Every ``interval``: one snapshot, its delta queued for every client (never
        waiting for one: a full queue drops that client)."""
        prev: dict[str, int] | None = None
        while True:
            await asyncio.sleep(self.interval)
            if self.machine is None or not self.streams:
                prev = None
                continue
            try:
                now = self.snapshot()
            except Exception as e:  # a pyvmm bug in a view: logged once, stream goes on
                self.errors.warn(f"events:{type(e).__name__}", f"event stream: {e!r}")
                continue
            if prev is None:
                prev = now
                continue
            delta = {k: v - prev.get(k, 0) for k, v in now.items() if v != prev.get(k, 0)}
            prev = now
            state = self.machine.state.value
            data = _sse("delta", {"interval_s": self.interval, "state": state,
                                  "delta": delta})
            for s in list(self.streams):
                try:
                    s.queue.put_nowait(data)
                except asyncio.QueueFull:
                    self.streams.discard(s)
                    s.dropped = True
                    self.dropped_streams += 1
                    self.errors.warn("events-slow", "event stream: a client that does not "
                                     f"read was dropped (queue of {QUEUE_DEPTH} full)")
                    s.task.cancel()


class _OnceHandler(logging.Handler):
    """aiohttp's own log (malformed requests, lost connections): one line per kind,
    logged once, then counted, without its traceback."""

    def __init__(self, once: OnceLog) -> None:
        super().__init__(logging.DEBUG)
        self.once = once

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        kind = type(exc).__name__ if exc is not None else record.getMessage()[:40]
        what = f"{record.getMessage()}: {exc!s}".splitlines()[0] if exc else \
            record.getMessage().splitlines()[0]
        self.once.warn(f"http:{kind}", f"control API: {what[:200]}")


class _NoVm(Exception):
    pass


def _listen_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(64)
    except OSError as e:
        s.close()
        raise ConfigError(f"web {host}:{port}: {e.strerror or e}") from None
    return s


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
