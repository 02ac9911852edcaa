"""The control API's OpenAPI 3.1 document, generated — never written by hand — from
the response models (``api/models.py``) and the config declarations
(``machine/config.py``'s JSON Schema, which ``schema.py`` makes from the same
``option(...)`` fields as the command line). Served at ``GET /api/v1/openapi.json``
and committed as docs/openapi.json (``pyvmm config --openapi``; a test fails when
the committed copy is stale).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from pyvmm import __version__ as _pkg_version
from pyvmm import schema
from pyvmm.api import models as M
from pyvmm.api.trace import DEFAULT_DEPTH, MAX_DEPTH
from pyvmm.machine.config import config_schema
from pyvmm.registry import DEVICES

PREFIX = "/api/v1"
REF = "#/components/schemas/"

# Fields whose schema is the typed config's, not their Python annotation's.
_CONFIG_REFS: dict[tuple[type, str], dict[str, Any]] = {
    (M.VmInfo, "config"): {"$ref": REF + "MachineConfig"},
    (M.Device, "config"): {"anyOf": [{"$ref": REF + "DeviceConfig"}, {"type": "null"}]}}


def _type_schema(t: Any) -> dict[str, Any]:
    if t is Any:
        return {}
    if t is bool:
        return {"type": "boolean"}
    if t is int:
        return {"type": "integer"}
    if t is float:
        return {"type": "number"}
    if t is str:
        return {"type": "string"}
    if dataclasses.is_dataclass(t):
        return {"$ref": REF + t.__name__}  # type: ignore[union-attr]
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1])}
    if isinstance(t, types.UnionType) or origin is typing.Union:
        rest = [a for a in args if a is not type(None)]
        inner = _type_schema(rest[0]) if len(rest) == 1 else {
            "anyOf": [_type_schema(a) for a in rest]}
        if set(inner) == {"type"} and isinstance(inner["type"], str):
            return {"type": [inner["type"], "null"]}
        return {"anyOf": [inner, {"type": "null"}]}
    raise TypeError(f"no schema for {t!r}")  # a pyvmm bug: a model field of a new type


def model_schema(cls: type) -> dict[str, Any]:
    """JSON Schema of a response dataclass: every field present, none other."""
    hints = typing.get_type_hints(cls)
    props: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        s: dict[str, Any] = dict(_CONFIG_REFS.get((cls, f.name)) or _type_schema(
            hints[f.name]))
        if f.metadata.get("doc"):
            s["description"] = f.metadata["doc"]
        props[f.name] = s
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "required": [f.name for f in dataclasses.fields(cls)],
                           "additionalProperties": False}
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        out["description"] = " ".join(cls.__doc__.split())
    return out


def _ok(ref: str, what: str) -> dict[str, Any]:
    return {"description": what,
            "content": {"application/json": {"schema": {"$ref": REF + ref}}}}


def _err(what: str) -> dict[str, Any]:
    return {"description": what,
            "content": {"application/json": {"schema": {"$ref": REF + "Error"}}}}


_NO_VM = _err("no VM attached to the server")


def _get(op: str, summary: str, ok: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"operationId": op, "summary": summary,
                    "responses": {"200": ok, "503": _NO_VM}}}


def _put(action: str, summary: str, codes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"put": {
        "operationId": f"vm_{action}", "summary": summary,
        "requestBody": {"required": False, "description": "none, or an empty JSON object",
                        "content": {"application/json": {"schema": {
                            "type": "object", "maxProperties": 0}}}},
        "responses": {**codes, "400": _err("a body that is not an empty JSON object"),
                      "413": _err("a body over 64 KiB"), "503": _NO_VM}}}


def openapi_document() -> dict[str, Any]:
    schemas: dict[str, Any] = {cls.__name__: model_schema(cls) for cls in M.MODELS}
    cfg = config_schema()
    cfg.pop("$schema", None)
    schemas["MachineConfig"] = cfg
    schemas["DeviceConfig"] = {
        "description": "a device's typed config as JSON (docs/config.md), without its type",
        "anyOf": [schema.json_schema(s.config, title=s.name) for s in DEVICES]}
    state = "409"
    paths: dict[str, Any] = {
        f"{PREFIX}/vm": _get("vm_info", "the VM's state, uptime and configuration",
                             _ok("VmInfo", "the VM")),
        f"{PREFIX}/vm.pause": _put("pause", "park the vCPU outside KVM_RUN (devices on the "
                                   "event loop go on)", {
                                       "200": _ok("VmAction", "paused"),
                                       state: _err("the VM is not running")}),
        f"{PREFIX}/vm.resume": _put("resume", "let a paused vCPU run on", {
            "200": _ok("VmAction", "running"), state: _err("the VM is not paused")}),
        f"{PREFIX}/vm.stop": _put("stop", "stop the VM (pyvmm exits with code 0, reason "
                                  "api)", {"200": _ok("VmAction", "stopping"),
                                           state: _err("the VM has stopped or is stopping")}),
        f"{PREFIX}/vm.reset": _put("reset", "reset the machine in place: not supported", {
            "501": _err("pyvmm cannot reset a machine in place")}),
        f"{PREFIX}/vm.map": _get("vm_map", "the machine map and what each bus decodes now",
                                 _ok("MachineMap", "the map")),
        f"{PREFIX}/pci": _get("pci", "the PCI tree as the guest enumerates it",
                              _ok("PciTree", "bus 0")),
        f"{PREFIX}/devices": _get("devices", "every device: mode, typed config, counters",
                                  _ok("DeviceList", "the devices")),
        PREFIX + "/devices/{name}/trace": {
            "parameters": [{"name": "name", "in": "path", "required": True,
                            "description": "a device's name, as in /api/v1/devices",
                            "schema": {"type": "string"}}],
            "get": {"operationId": "trace_get",
                    "summary": "the device's register-decoded access trace (its ring)",
                    "responses": {"200": _ok("Trace", "the trace"),
                                  "404": _err("no such device"), "503": _NO_VM}},
            "put": {"operationId": "trace_set",
                    "summary": "turn the device's trace on (its ranges get a tracer: the "
                               "hot path pays only while it is on) or off",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"type": "object", "required": ["enabled"],
                                   "additionalProperties": False, "properties": {
                                       "enabled": {"type": "boolean"},
                                       "depth": {"type": "integer", "minimum": 1,
                                                 "maximum": MAX_DEPTH,
                                                 "default": DEFAULT_DEPTH}}}}}},
                    "responses": {"200": _ok("Trace", "the trace"),
                                  "400": _err("a body that is not {enabled, depth}"),
                                  "404": _err("no such device"),
                                  "413": _err("a body over 64 KiB"), "503": _NO_VM}}},
        f"{PREFIX}/vm.counters": _get("vm_counters", "exits by kind and device, interrupts "
                                      "by GSI/vector and route", _ok("Counters", "totals")),
        f"{PREFIX}/events": {"get": {
            "operationId": "events",
            "summary": "server-sent events: first the totals (event: totals), then every "
                       "interval the changed counters (event: delta); keys as "
                       "exits.<kind>, device.<name>, irq.<route>.<gsiN|vectorN>",
            "responses": {"200": {"description": "an endless text/event-stream",
                                  "content": {"text/event-stream": {
                                      "schema": {"type": "string"}}}},
                          "503": _NO_VM}}},
        f"{PREFIX}/openapi.json": {"get": {
            "operationId": "openapi", "summary": "this document",
            "responses": {"200": {"description": "OpenAPI 3.1",
                                  "content": {"application/json": {
                                      "schema": {"type": "object"}}}}}}},
        "/": {"get": {
            "operationId": "web_page",
            "summary": "the live web view (plain HTML and JS reading this API)",
            "responses": {"200": {"description": "the page",
                                  "content": {"text/html": {
                                      "schema": {"type": "string"}}}}}}},
        "/metrics": {"get": {
            "operationId": "metrics",
            "summary": "the counters in the Prometheus text exposition format",
            "responses": {"200": {"description": "Prometheus text format 0.0.4",
                                  "content": {"text/plain": {
                                      "schema": {"type": "string"}}}},
                          "503": _NO_VM}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "pyvmm control API", "version": _pkg_version,
                 "description": "HTTP/1.1 on the Unix socket given with `pyvmm run "
                                "--api-socket PATH` (docs/api.md). Errors are "
                                "{\"error\": ...} with a 4xx/5xx status."},
        "servers": [{"url": "http://localhost",
                     "description": "the Unix socket (curl --unix-socket PATH)"}],
        "paths": paths,
        "components": {"schemas": schemas},
    }
