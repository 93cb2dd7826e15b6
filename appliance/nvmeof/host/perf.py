"""A closed-loop I/O load generator (like ``spdk_nvme_perf``) for ``kahu nvme perf`` and the benchmark.

``qd`` commands are kept in flight for ``seconds``: each completion callback starts the next one
(``Controller.start_io``), so there is no task or Future per I/O. Latency is measured per command
from submission to completion.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass

from ..spec import IoOpcode
from .controller import Controller

PATTERNS = ("randread", "randwrite", "read", "write")
_clock = time.perf_counter_ns


@dataclass(slots=True)
class PerfResult:
    pattern: str
    io_size: int
    qd: int
    queues: int
    ios: int
    seconds: float
    iops: float
    mbps: float  # 10^6 bytes per second
    p50_us: float
    p99_us: float

    @classmethod
    def measured(
        cls, pattern: str, io_size: int, qd: int, queues: int, latencies_ns: list[int], seconds: float
    ) -> PerfResult:
        """The figures of ``seconds`` in which I/Os of these latencies (ns, one per I/O) completed."""
        lat = sorted(latencies_ns)
        ios = len(lat)
        return cls(
            pattern, io_size, qd, queues, ios, seconds, ios / seconds, ios * io_size / seconds / 1e6,
            percentile(lat, 0.50) / 1e3, percentile(lat, 0.99) / 1e3,
        )  # fmt: skip

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(sorted_values: list[int], fraction: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


async def run_perf(
    ctrl: Controller,
    nsid: int,
    io_size: int,
    qd: int,
    pattern: str,
    seconds: float,
    region_bytes: int | None = None,
) -> PerfResult:
    """Run ``pattern`` at queue depth ``qd`` for ``seconds`` over the first ``region_bytes`` of ``nsid``."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}")
    ns = ctrl.namespaces.get(nsid)
    if ns is None:
        raise ValueError(f"namespace {nsid} not found on {ctrl.subnqn}")
    if io_size <= 0 or io_size % ns.block_size:
        raise ValueError(f"io size {io_size} is not a positive multiple of the block size {ns.block_size}")
    nlb = io_size // ns.block_size
    slots = min(ns.num_blocks, (region_bytes or ns.num_blocks * ns.block_size) // ns.block_size) // nlb
    if slots < 1:
        raise ValueError(f"namespace {nsid} is smaller than one {io_size}-byte I/O")
    opcode = IoOpcode.READ if pattern.endswith("read") else IoOpcode.WRITE
    load = _ClosedLoop(ctrl, nsid, opcode, io_size, nlb, slots, not pattern.startswith("rand"), qd, seconds)
    began = _clock()
    await load.run()
    elapsed = (_clock() - began) / 1e9
    return PerfResult.measured(pattern, io_size, qd, ctrl.io_queues, load.latencies, elapsed)


class _ClosedLoop:
    """``qd`` I/O slots with a buffer each; a completion restarts its slot until the deadline."""

    def __init__(
        self, ctrl: Controller, nsid: int, opcode: int, io_size: int, nlb: int, slots: int, sequential: bool,
        qd: int, seconds: float,
    ):  # fmt: skip
        self.start_io = ctrl.start_io
        self.nsid = nsid
        self.opcode = opcode
        self.nlb = nlb
        self.slots = slots
        self.sequential = sequential
        self.buffers = [memoryview(bytearray(random.randbytes(io_size))) for _ in range(qd)]
        self.started = [0] * qd
        self.latencies: list[int] = []
        self.cursor = 0
        self.running = 0
        self.deadline = _clock() + int(seconds * 1e9)
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def run(self) -> None:
        """Start every slot; return when all have stopped, or raise the first error."""
        for slot in range(len(self.buffers)):
            self.running += 1
            self._issue(slot)
        await self.finished

    def _issue(self, slot: int) -> None:
        if self.sequential:
            lba = self.cursor * self.nlb
            self.cursor = (self.cursor + 1) % self.slots
        else:
            lba = int(random.random() * self.slots) * self.nlb
        self.started[slot] = _clock()
        self.start_io(self.opcode, self.nsid, lba, self.buffers[slot], self._done, slot)

    def _done(self, slot: int, error: BaseException | None) -> None:
        end = _clock()
        if error is None:
            self.latencies.append(end - self.started[slot])
            if end < self.deadline and not self.finished.done():
                try:
                    return self._issue(slot)
                except Exception as e:
                    error = e
        self.running -= 1
        if self.finished.done():
            return
        if error is not None:
            self.finished.set_exception(error)
        elif not self.running:
            self.finished.set_result(None)
