"""The control API: REST on a Unix socket (docs/api.md), its OpenAPI document, the
Prometheus collector and the ``pyvmm remote`` client. Nothing here is imported when
``--api-socket`` is not given."""

# ``pyvmm remote`` commands -> (method, path); here, not in client.py, because the
# CLI's parser lists them and must not import http.client to do so (start-up).
COMMANDS: dict[str, tuple[str, str]] = {
    "state": ("GET", "/api/v1/vm"),
    "pause": ("PUT", "/api/v1/vm.pause"),
    "resume": ("PUT", "/api/v1/vm.resume"),
    "stop": ("PUT", "/api/v1/vm.stop"),
    "reset": ("PUT", "/api/v1/vm.reset"),
    "devices": ("GET", "/api/v1/devices"),
    "counters": ("GET", "/api/v1/vm.counters"),
    "map": ("GET", "/api/v1/vm.map"),
    "pci": ("GET", "/api/v1/pci"),
    # These take a DEVICE (a name from `devices`).
    "trace": ("GET", "/api/v1/devices/{name}/trace"),
    "trace-on": ("PUT", "/api/v1/devices/{name}/trace"),
    "trace-off": ("PUT", "/api/v1/devices/{name}/trace"),
}
