"""Start, supervise and stop a node's drive target, and keep its configuration applied.

SPDK's ``nvmf_tgt`` (or ``spdk_tgt``) is used when installed; otherwise Kahu's soft target is started
with only an RPC socket, and configured through the same wrapper and reconciler as SPDK, so the one
code path is exercised everywhere. A target that dies loses all its configuration (SPDK keeps none),
so the supervisor restarts it, with exponential backoff, and re-applies the desired state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..procs import kahu_command, kahu_env, stop_async_process, tied_to_parent
from .nodeconfig import DriveKind, NodeConfig
from .pci import hugepages_reserved
from .reconciler import DesiredState, Plan, desired_state, reconcile
from .rpc import RpcError, SpdkRpc

log = logging.getLogger(__name__)

SPDK_BINARIES = ("nvmf_tgt", "spdk_tgt")
SPDK_BIN_ENV = "KAHU_SPDK_BIN"
NO_HUGE_MEM_MB = 1024  # --no-huge needs -s; enough for a few TCP qpairs and malloc-free bdevs
START_TIMEOUT = 30.0  # socket + framework_wait_init; SPDK spends a while mapping memory
STOP_TIMEOUT = 10.0
RPC_TIMEOUT = 30.0
DEFAULT_STATE_DIR = Path(".kahu")  # drive files, logs and runtime files


@dataclass(frozen=True)
class Backoff:
    """Restart delays: ``first`` doubling up to ``limit``; give up after ``attempts`` failed starts."""

    first: float = 0.5
    limit: float = 30.0
    attempts: int = 10


def find_spdk_binary(configured: str | None = None) -> str | None:
    """SPDK's target binary: the configured one, else $KAHU_SPDK_BIN, else nvmf_tgt/spdk_tgt on PATH."""
    named = configured or os.environ.get(SPDK_BIN_ENV)
    if named:
        path = shutil.which(named)
        if path is None:
            raise FileNotFoundError(f"SPDK binary {named} (from config or ${SPDK_BIN_ENV}) is not executable")
        return path
    return next((p for p in map(shutil.which, SPDK_BINARIES) if p), None)


def spdk_command(binary: str, config: NodeConfig) -> list[str]:
    """nvmf_tgt's arguments for this node: cores, memory, hugepages or not, PCI or not, RPC socket."""
    spdk = config.spdk
    no_huge = spdk.no_huge if spdk.no_huge is not None else hugepages_reserved() == 0
    mem = spdk.mem_size_mb or (NO_HUGE_MEM_MB if no_huge else None)
    no_pci = spdk.no_pci or not any(d.kind is DriveKind.PCI for d in config.drives)
    argv = [binary, "-m", spdk.cpumask, "-r", spdk.rpc_socket]
    if mem is not None:
        argv += ["-s", str(mem)]
    if no_huge:
        argv.append("--no-huge")
    if no_pci:
        argv.append("-u")
    return argv


def soft_target_command(rpc_socket: str, state_dir: Path) -> list[str]:
    """The soft target serving an empty configuration with only an RPC socket, like a fresh nvmf_tgt."""
    state_dir.mkdir(parents=True, exist_ok=True)
    config = state_dir / "soft-target.yaml"
    config.write_text(f"rpc_socket: {rpc_socket}\n")
    return kahu_command("target", "serve", str(config))


class TargetProcess:
    """One drive-target process and its RPC socket."""

    def __init__(self, argv: list[str], rpc_socket: str, log_path: Path):
        self.argv = argv
        self.rpc_socket = rpc_socket
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self, timeout: float = START_TIMEOUT) -> SpdkRpc:
        """Spawn the target, wait (bounded) for its socket and for framework init; return a connection."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.rpc_socket)  # a dead target's socket would be mistaken for the new one's
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                env=kahu_env(),
                start_new_session=True,  # a terminal's Ctrl-C is for the supervisor, not the target
                preexec_fn=tied_to_parent(),  # a supervisor that crashes takes its target with it
            )
        log.info("started %s (pid %d)", self.argv[0], self.proc.pid)
        try:
            return await asyncio.wait_for(self._connect(timeout), timeout)
        except (TimeoutError, RpcError) as e:
            await self.stop()
            problem = f"{' '.join(self.argv)} did not come up: {e}; see {self.log_path}"
            raise RpcError("start", None, problem) from e

    async def _connect(self, timeout: float) -> SpdkRpc:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.rpc_socket):
            if self.proc.returncode is not None:
                raise RpcError("start", None, f"exited with status {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no socket {self.rpc_socket} after {timeout:g}s")
            await asyncio.sleep(0.05)  # polling the file system: nothing to await on
        rpc = await asyncio.to_thread(SpdkRpc.connect, self.rpc_socket, RPC_TIMEOUT, timeout)
        try:
            await asyncio.to_thread(rpc.framework_wait_init)
        except BaseException:
            rpc.close()
            raise
        return rpc

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, a bounded wait, then SIGKILL; idempotent."""
        if self.proc is not None:
            await stop_async_process(self.proc, timeout)


class NodeTarget:
    """A node's drive target, running, reconciled with ``config`` and restarted when it dies.

    ``async with NodeTarget(config) as nt:`` returns once the target runs and exports the config;
    ``nt.rpc`` is the live connection; ``await nt.wait_applied(n)`` waits for the n-th application.
    """

    def __init__(self, config: NodeConfig, state_dir: Path | str = DEFAULT_STATE_DIR,
                 backoff: Backoff | None = None, desired: DesiredState | None = None,
                 soft: bool | None = None):
        """``soft``: None uses SPDK when installed, True always the soft target, False requires SPDK."""
        self.config = config
        self.state_dir = Path(state_dir)
        self.backoff = backoff or Backoff()
        self.desired = desired or desired_state(config)
        binary = None if soft else find_spdk_binary(config.spdk.binary)
        if soft is False and binary is None:
            raise FileNotFoundError(f"no SPDK target binary: set spdk.binary, ${SPDK_BIN_ENV} or PATH")
        self.kind = "spdk" if binary else "soft"
        rpc_socket = config.spdk.rpc_socket
        argv = spdk_command(binary, config) if binary else soft_target_command(rpc_socket, self.state_dir)
        self.process = TargetProcess(argv, rpc_socket, self.state_dir / "target.log")
        self.applied = 0  # how many times the desired state was applied (1 + restarts)
        self.last_plan = Plan()
        self._rpc: SpdkRpc | None = None
        self._changed = asyncio.Condition()
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def rpc(self) -> SpdkRpc:
        if self._rpc is None:
            raise RpcError("rpc", None, "the target is not running")
        return self._rpc

    async def __aenter__(self) -> NodeTarget:
        await self._start_and_apply()
        self._supervisor = asyncio.create_task(self._supervise(), name="kahu-target-supervisor")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._shutdown()

    async def wait(self) -> None:
        """Return only when supervision gave up (raises why); run alongside a shutdown signal."""
        assert self._supervisor is not None
        await asyncio.shield(self._supervisor)

    async def wait_applied(self, count: int) -> None:
        """Wait until the desired state has been applied ``count`` times."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.applied >= count)

    async def apply(self, desired: DesiredState) -> Plan:
        """Switch to a new desired state (kept for restarts) and reconcile the running target to it."""
        self.desired = desired
        self.last_plan = await asyncio.to_thread(reconcile, self.rpc, desired)
        return self.last_plan

    async def _start_and_apply(self) -> None:
        self._rpc = await self.process.start()
        try:
            await self.apply(self.desired)
        except BaseException:
            await self._shutdown()
            raise
        async with self._changed:
            self.applied += 1
            self._changed.notify_all()

    async def _shutdown(self) -> None:
        if self._rpc is not None:
            self._rpc.close()
            self._rpc = None
        await self.process.stop()

    async def _supervise(self) -> None:
        while True:
            status = await self.process.wait()
            log.warning("drive target (pid %s) exited with status %s; restarting", self.process.pid, status)
            await self._shutdown()
            await self._restart()

    async def _restart(self) -> None:
        delay = self.backoff.first
        for attempt in range(1, self.backoff.attempts + 1):
            await asyncio.sleep(delay)  # backoff between attempts, not synchronisation
            try:
                await self._start_and_apply()
                return
            except (RpcError, OSError) as e:
                log.error("restart attempt %d/%d failed: %s", attempt, self.backoff.attempts, e)
                delay = min(delay * 2, self.backoff.limit)
        attempts = self.backoff.attempts
        raise RpcError("restart", None, f"drive target did not come back after {attempts} attempts")
