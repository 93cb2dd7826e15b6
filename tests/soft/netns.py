"""Helpers for tests that run nodes in network namespaces (``appliance.spdk_rpc.netconf.Topology``).

``requires_netns`` skips where namespaces cannot be made; ``start_tcp_listener`` and ``tcp_greeting``
prove that two nodes really reach each other over the bridge; ``wait_for_line`` is the bounded wait
for a spawned process to say it is ready (instead of sleeping).
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import time
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
