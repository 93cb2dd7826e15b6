"""Helpers for tests that run nodes in network namespaces (``appliance.spdk_rpc.netconf.Topology``).

``requires_netns`` skips where namespaces cannot be made; ``start_tcp_listener`` and ``tcp_greeting``
prove that two nodes really reach each other over the bridge; ``wait_for_line`` is the bounded wait
for a spawned process to say it is ready (instead of sleeping), and ``wait_for_link_deletion`` the one
for the kernel to delete a link (it reports the deletion over netlink, so nothing polls).
"""

from __future__ import annotations

import os
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from pyroute2 import netns

from appliance.spdk_rpc.netconf import Topology

requires_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need root and iproute2 (ip netns exec)",
)

READY = "READY"
_LISTENER = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("READY", flush=True)
conn, peer = srv.accept()
conn.sendall(f"{sys.argv[3]} sees {peer[0]}".encode())
conn.close()
"""
_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
    print(s.recv(4096).decode())
"""


def existing_namespaces() -> set[str]:
    return set(netns.listnetns())


def wait_for_line(proc: subprocess.Popen[Any], expected: str, timeout: float = 10.0) -> None:
    """Read ``proc``'s stdout until a line equal to ``expected``; fail after ``timeout`` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                break
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"process exited ({proc.wait()}) before printing {expected!r}")
            if line.strip() == expected:
                return
    raise AssertionError(f"no {expected!r} line within {timeout}s")


def start_tcp_listener(topology: Topology, node_index: int, port: int) -> subprocess.Popen[str]:
    """A one-shot TCP server in a node that tells its client which address it came from."""
    node = topology.node(node_index)
    proc = topology.spawn(
        node_index,
        [sys.executable, "-c", _LISTENER, node.address, str(port), node.namespace],
        stdout=subprocess.PIPE,
        text=True,
    )
    wait_for_line(proc, READY)
    return proc


def tcp_greeting(topology: Topology, node_index: int, address: str, port: int, timeout: float = 10.0) -> str:
    """Connect from a node to ``address:port`` and return what the server sent."""
    argv = [sys.executable, "-c", _CLIENT, address, str(port), str(timeout)]
    return topology.run(node_index, argv, timeout=timeout + 5).stdout.strip()


def spawn_tcp_client(
    topology: Topology, node_index: int, address: str, port: int, timeout: float = 10.0
) -> subprocess.Popen[str]:
    """``tcp_greeting`` without waiting for it: to run several at once, or to serve it from the test."""
    argv = [sys.executable, "-c", _CLIENT, address, str(port), str(timeout)]
    return topology.spawn(node_index, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def recv_all(sock: socket.socket) -> str:
    """Everything the peer sends until it closes (one recv may return only part of it)."""
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks).decode()


_RTMGRP_LINK = 0x1
_RTM_DELLINK = 17
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change


def wait_for_link_deletion(ifname: str, trigger: Callable[[], None], timeout: float = 10.0) -> None:
    """Call ``trigger`` and wait until the kernel deletes root-namespace link ``ifname``.

    Subscribes to link events before looking the link up and triggering, so the deletion cannot be
    missed however soon it happens; fails after ``timeout`` seconds.
    """
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as events:
        events.bind((0, _RTMGRP_LINK))
        index = socket.if_nametoindex(ifname)
        trigger()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            events.settimeout(left)
            try:
                data = events.recv(65536)
            except TimeoutError:
                break
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, msg_type = _NLMSGHDR.unpack_from(data, offset)[:2]
                body = offset + _NLMSGHDR.size
                if msg_type == _RTM_DELLINK and _IFINFOMSG.unpack_from(data, body)[2] == index:
                    return
                offset += max((length + 3) & ~3, _NLMSGHDR.size)
    raise AssertionError(f"link {ifname} (index {index}) not deleted within {timeout}s")


def root_links() -> set[str]:
    """Interface names in the root namespace."""
    return {name for _, name in socket.if_nameindex()}
