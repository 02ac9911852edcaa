"""The typed configuration: one declaration, and the CLI, the JSON loader, the JSON
Schema and docs/config.md agree with it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest

from pyvmm import schema
from pyvmm.errors import ConfigError
from pyvmm.machine.config import MachineConfig, config_schema
from pyvmm.machine.configdoc import config_doc
from pyvmm.registry import DEVICES
from tests.conftest import ROOT, pyvmm_cmd


def test_docs_config_md_is_current() -> None:
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == config_doc(), "docs/config.md is stale: run `pyvmm config --doc " \
        "> docs/config.md`"


def test_run_help_is_made_from_the_same_declarations() -> None:
    p = subprocess.run(pyvmm_cmd("run", "--help"), capture_output=True, text=True, check=True)
    text = " ".join(p.stdout.split())
    for f in schema.fields_of(MachineConfig):
        if f.cli != "":
            assert (f.cli or "--" + f.name.replace("_", "-")) in text
            assert " ".join(f.doc.split()[:4]) in text, f.name
    for spec in DEVICES:
        assert spec.name in text or spec.summary.split()[0] in text


GOOD = [
    {"kernel": "k.elf"},
    {"kernel": "k.elf", "memory": "128M", "irqchip": "split", "quiet": True, "timeout": 2.5,
     "devices": [{"type": "virtio-blk", "path": "d.img", "readonly": True},
                 {"type": "nvme", "path": "d.img"},
                 {"type": "virtio-rng", "transport": "mmio", "rate": 100},
                 {"type": "virtio-console", "backend": "socket:/tmp/c"},
                 {"type": "virtio-net", "tap": "auto", "mac": "52:54:00:00:00:01"}]},
    {"kernel": "k.elf", "memory": 256, "load_addr": 1048576, "entry": None},
]
BAD = [
    ({"kernel": "k.elf", "quiet": "false"}, "quiet: 'false' is not a boolean"),
    ({"kernel": "k.elf", "memory": True}, "memory: True is not a size"),
    ({"kernel": "k.elf", "memroy": "1G"}, "did you mean 'memory'"),
    ({"kernel": "k.elf", "timeout": -1}, "timeout must be between"),
    ({"kernel": "k.elf", "irqchip": "xen"}, "not one of kernel, split"),
    ({"kernel": "k.elf", "devices": [{"type": "virtio-blk"}]}, "path is required"),
    ({"kernel": "k.elf", "devices": [{"type": "virtio-blk", "path": "d", "readonly": 1}]},
     "readonly: 1 is not a boolean"),
    ({"kernel": "k.elf", "devices": [{"type": "virtio-blok", "path": "d"}]},
     "did you mean 'virtio-blk'"),
    ({"kernel": "k.elf", "devices": [{"type": "nvme", "path": "d", "transport": "mmio"}]},
     "unknown key 'transport'"),
    ({"kernel": "k.elf", "devices": [{"type": "virtio-net", "mac": "01:00:00:00:00:00"}]},
     "multicast"),
    ({"kernel": "k.elf", "load_addr": 1 << 70}, "not an address"),
    ({"kernel": 5}, "kernel: 5 is not a string"),
    ({"kernel": "k\0.elf"}, "NUL byte"),
]


@pytest.mark.parametrize("raw", GOOD)
def test_good_configs_load_and_satisfy_the_schema(raw: dict[str, object]) -> None:
    MachineConfig.from_dict(raw)
    jsonschema.validate(raw, config_schema())


@pytest.mark.parametrize("raw,text", BAD)
def test_bad_configs_are_one_line_errors(raw: dict[str, object], text: str) -> None:
    with pytest.raises(ConfigError) as e:
        MachineConfig.from_dict(raw)
    assert text in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("raw", [r for r, _ in BAD if "kernel" in r and isinstance(
    r.get("kernel"), str) and "\0" not in str(r["kernel"]) and "timeout" not in r
    and "mac" not in json.dumps(r) and "load_addr" not in r])
def test_the_schema_refuses_them_too(raw: dict[str, object]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(raw, config_schema())


def test_schema_command_prints_the_same_schema() -> None:
    p = subprocess.run(pyvmm_cmd("config", "--schema"), capture_output=True, text=True,
                       check=True)
    assert json.loads(p.stdout) == json.loads(json.dumps(config_schema()))


@pytest.mark.parametrize("text,positional,want", [
    ("path=a.img,readonly=on", None, {"path": "a.img", "readonly": "on"}),
    ("a,,b.img,readonly=off", "path", {"path": "a,b.img", "readonly": "off"}),
    ("socket:/tmp/x", "backend", {"backend": "socket:/tmp/x"}),
    ("", None, {}),
])
def test_key_value_parser(text: str, positional: str | None, want: dict[str, str]) -> None:
    assert schema.parse_kv(text, positional) == want


def test_key_value_parser_errors() -> None:
    with pytest.raises(ConfigError):
        schema.parse_kv("novalue")


def test_a_repeated_key_is_a_list_only_for_list_fields() -> None:
    assert schema.parse_kv("a=1,b=2,a=3") == {"a": ["1", "3"], "b": "2"}
    with pytest.raises(ConfigError) as e:
        MachineConfig.from_dict({"kernel": "k", "devices": [
            {"type": "virtio-blk", "path": ["a", "b"]}]}, text=True)
    assert "path: given more than once" in str(e.value)


@pytest.mark.parametrize("value,want", [("on", True), ("OFF", False), ("yes", True),
                                        ("0", False)])
def test_text_booleans(value: str, want: bool) -> None:
    cfg = MachineConfig.from_dict({"kernel": "k", "quiet": value}, text=True)
    assert cfg.quiet is want


def test_sizes() -> None:
    assert MachineConfig.from_dict({"kernel": "k", "memory": "1G"}).memory == 1 << 30
    assert MachineConfig.from_dict({"kernel": "k", "memory": 128}).memory == 128 << 20
    assert MachineConfig.from_dict({"kernel": "k", "memory": "4096K"}, text=True).memory == 4 << 20


def test_config_file_problems_are_one_line(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text('{"kernel": ' + "[" * 100000 + "]" * 100000 + "}")
    big_int = tmp_path / "int.json"
    big_int.write_text('{"kernel": "k", "memory": ' + "9" * 5000 + "}")
    for p, text in ((deep, "cannot be read as JSON"), (big_int, "cannot be read as JSON")):
        with pytest.raises(ConfigError) as e:
            MachineConfig.from_json(str(p))
        assert text in str(e.value)
