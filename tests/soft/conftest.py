"""Shared pieces of the soft-target tests: a bounded ``run``, in-process targets, a `kahu target serve`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nvme_wire import HOSTNQN as WIRE_HOSTNQN

from appliance.nvmeof.spec import DISCOVERY_NQN
from appliance.nvmeof.target.config import apply_target_config, parse_target_config
from appliance.nvmeof.target.model import Bdev, ListenAddress, MallocBdev, Subsystem, Transport
from appliance.nvmeof.target.server import TargetServer
from appliance.procs import kahu_command, stop_process

REPO = Path(__file__).resolve().parents[2]
TEST_NQN = "nqn.2026-11.io.kahu:test"
TEST_TIMEOUT = 20.0


def run_kahu(*args: str, home: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``kahu ARGS`` as a user runs it, output captured; $KAHU_ETCD unset, $KAHU_HOME ``home`` if given."""
    env = {k: v for k, v in os.environ.items() if k != "KAHU_ETCD"}
    if home is not None:
        env["KAHU_HOME"] = str(home)
    return subprocess.run(kahu_command(*args), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run(coro: Any, timeout: float = TEST_TIMEOUT, runner: Callable[[Any], Any] = asyncio.run) -> Any:
    """Run a test scenario on a fresh event loop (``runner``: e.g. ``uvloop.run``) with a hard time bound."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return runner(bounded())


@contextlib.asynccontextmanager
async def serve_bdevs(
    bdevs: list[Bdev] | None = None, hosts: list[str] | None = None, port: int = 0, **transport
) -> AsyncIterator[tuple[TargetServer, int]]:
    """A soft target built from model objects: ``bdevs`` (default: 8 MiB of 512-byte blocks) as TEST_NQN.

    ``transport`` are ``Transport`` options; ``hosts`` None allows any host. The subsystem and
    discovery share one listener on 127.0.0.1 (``port`` 0: an ephemeral one); yields (server, port).
    """
    async with TargetServer() as server:
        target = server.target
        target.add_transport(Transport(**transport))
        target.add_subsystem(
            Subsystem(
                TEST_NQN, serial_number="KAHUHOST0001", allow_any_host=hosts is None, hosts=list(hosts or [])
            )
        )
        for bdev in bdevs or [MallocBdev("m0", 512, 16384)]:
            target.add_bdev(bdev)
            target.add_namespace(TEST_NQN, bdev.name)
        address = ListenAddress("127.0.0.1", str(port))
        await target.add_listener(TEST_NQN, address)
        await target.add_listener(DISCOVERY_NQN, address)
        yield server, server.bound_port(address)


def default_target_config(tmp_path: Path) -> dict[str, Any]:
    """One subsystem (a RAM and a file namespace) for WIRE_HOSTNQN, KAS 1 so short KATOs are possible."""
    return {
        "transport": {"kas": 1},
        "discovery": {"listeners": [{"traddr": "127.0.0.1", "trsvcid": "0"}]},
        "subsystems": [
            {
                "nqn": TEST_NQN,
                "serial_number": "KAHUTEST0001",
                "hosts": [WIRE_HOSTNQN],
                "listeners": [{"traddr": "127.0.0.1", "trsvcid": "0"}],
                "namespaces": [
                    {"malloc": "16MiB", "block_size": 512},
                    {"file": str(tmp_path / "ns2.img"), "size": "8MiB", "block_size": 4096},
                ],
            }
        ],
    }


@dataclass
class RunningTarget:
    server: TargetServer

    def port(self, nqn: str = TEST_NQN, index: int = 0) -> int:
        sub = self.server.target.subsystem(nqn)
        return self.server.bound_port(sub.listeners[index])

    @property
    def io_port(self) -> int:
        return self.port()

    @property
    def discovery_port(self) -> int:
        return self.port(DISCOVERY_NQN)


@pytest.fixture
def soft_target(tmp_path: Path) -> Callable[..., contextlib.AbstractAsyncContextManager[RunningTarget]]:
    """``async with soft_target(config=None) as t``: a TargetServer on loopback for one scenario.

    ``config`` is the YAML document as a dict (default: :func:`default_target_config`); trsvcid "0"
    listeners get ephemeral ports, found with ``t.port(nqn)``.
    """

    @contextlib.asynccontextmanager
    async def start(config: dict[str, Any] | None = None) -> AsyncIterator[RunningTarget]:
        cfg = parse_target_config(config if config is not None else default_target_config(tmp_path))
        async with TargetServer() as server:
            await apply_target_config(server, cfg)
            yield RunningTarget(server)

    return start


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    addresses: list[tuple[str, int]]  # from the "listening tcp HOST:PORT" lines
    output: list[str]


@contextlib.contextmanager
def kahu_target_serve(config: Path, listeners: int) -> Iterator[ServeProcess]:
    """``kahu target serve CONFIG`` for the block, once it announced ``listeners`` listening lines."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main", "target", "serve", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        served = ServeProcess(proc, [], [])
        deadline = time.monotonic() + TEST_TIMEOUT
        pending = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while len(served.addresses) < listeners:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise TimeoutError(f"kahu target serve not ready: {served.output}")
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"kahu target serve exited {proc.wait(5)}: {served.output}")
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace")
                    served.output.append(line)
                    if line.startswith("listening tcp "):
                        host, port = line.split()[2].rsplit(":", 1)
                        served.addresses.append((host, int(port)))
        yield served
    finally:
        stop_process(proc)
        proc.stdout.close()


@pytest.fixture
def kahu_serve(tmp_path: Path) -> Iterator[Callable[[str, int], ServeProcess]]:
    """``kahu_serve(config_text, listeners)``: :func:`kahu_target_serve` until the test ends."""
    with contextlib.ExitStack() as stack:

        def start(config_text: str, listeners: int) -> ServeProcess:
            config = tmp_path / "target.yaml"
            config.write_text(config_text)
            return stack.enter_context(kahu_target_serve(config, listeners))

        yield start
