"""The learning switch: flooding while a MAC is unknown, unicast once learnt, never
back out of the ingress port, policing per port, drops when a guest's port is full;
and virtio-net on a switch port offers no offload features."""

from __future__ import annotations

import pytest

from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.event import EventManager
from pyvmm.sharing.switch import Switch, SwitchPort
from pyvmm.uapi import virtio as V

HDR = bytes(V.VIRTIO_NET_HDR_SIZE)
MAC = {n: bytes((0x52, 0x54, 0, 0, 0, n)) for n in range(1, 4)}


def frame(dst: bytes, src: bytes, payload: bytes = b"x" * 46) -> bytes:
    return HDR + dst + src + b"\x08\x00" + payload


@pytest.fixture
def net() -> tuple[EventManager, Switch, list[SwitchPort]]:
    ev = EventManager()
    sw = Switch(ev)
    ports = [sw.port(f"p{i}") for i in range(3)]
    yield ev, sw, ports  # type: ignore[misc]
    sw.close()
    for p in ports:
        p.close()
    ev.close()


def drain(ev: EventManager, ports: list[SwitchPort]) -> list[list[bytes]]:
    for _ in range(5):
        ev.run_once(0.01)
    out = []
    for p in ports:
        got = []
        while (f := p.read()) is not None:
            got.append(f)
        out.append(got)
    return out


def test_flood_then_learn_then_unicast(net: tuple[EventManager, Switch, list[SwitchPort]]
                                       ) -> None:
    ev, sw, (a, b, c) = net
    f1 = frame(MAC[2], MAC[1])
    a.writev([f1])
    assert drain(ev, [a, b, c]) == [[], [f1], [f1]]  # 2 unknown: flooded, not back to a
    f2 = frame(MAC[1], MAC[2])
    b.writev([f2])
    assert drain(ev, [a, b, c]) == [[f2], [], []]  # 1 was learnt on a
    f3 = frame(MAC[2], MAC[1])
    a.writev([f3])
    assert drain(ev, [a, b, c]) == [[], [f3], []]  # and 2 on b
    bc = frame(b"\xff" * 6, MAC[3])
    c.writev([bc])
    assert drain(ev, [a, b, c]) == [[bc], [bc], []]
    assert sw.flooded == 2
    a.writev([HDR + b"short"])
    drain(ev, [a, b, c])
    assert sw.malformed == 1


def test_policing_and_congestion() -> None:
    ev = EventManager()
    sw = Switch(ev)
    fast, slow = sw.port("fast", rate=1000), sw.port("slow")
    try:
        f = frame(MAC[2], MAC[1], b"y" * 400)  # 466 bytes with header
        for _ in range(4):
            fast.writev([f])
        for _ in range(5):
            ev.run_once(0.01)
        st = {s.name: s for s in sw.stats()}
        assert st["fast"].rx_frames == 4 and st["fast"].policed == 2  # 1000 B of burst
        assert st["slow"].tx_frames == 2
        # the slow guest never reads: its socket fills, later frames are dropped, counted
        for _ in range(2000):
            fast.writev([frame(MAC[2], MAC[1])])
            ev.run_once(0)
            sw.ports[0].limit = None
        assert st["slow"].congested > 0
    finally:
        sw.close()
        fast.close()
        slow.close()
        ev.close()


def test_virtio_net_on_a_switch_port_offers_no_offloads(
        net: tuple[EventManager, Switch, list[SwitchPort]]) -> None:
    ev, _, (a, _, _) = net
    dev = VirtioNet(a, MAC[1], ev)
    for bit in (V.VIRTIO_NET_F_CSUM, V.VIRTIO_NET_F_GUEST_TSO4, V.VIRTIO_NET_F_HOST_TSO4):
        assert not dev.features & (1 << bit)
    assert dev.features & (1 << V.VIRTIO_NET_F_MRG_RXBUF)
