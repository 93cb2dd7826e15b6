"""A closed-loop I/O load generator (like ``spdk_nvme_perf``) for ``kahu nvme perf`` and the benchmark.

``qd`` coroutines each keep one command in flight for ``seconds``; latency is measured per command
from submission to completion.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass

from .controller import Controller

PATTERNS = ("randread", "randwrite", "read", "write")


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
    op = ctrl.read if pattern.endswith("read") else ctrl.write
    sequential = not pattern.startswith("rand")
    latencies: list[int] = []
    cursor = 0
    clock = time.perf_counter_ns
    deadline = clock() + int(seconds * 1e9)

    async def worker() -> None:
        nonlocal cursor
        buf = memoryview(bytearray(random.randbytes(io_size)))
        uniform = random.random
        record = latencies.append
        while True:
            if sequential:
                lba = cursor * nlb
                cursor = (cursor + 1) % slots
            else:
                lba = int(uniform() * slots) * nlb
            start = clock()
            await op(nsid, lba, buf)
            end = clock()
            record(end - start)
            if end >= deadline:
                return

    began = clock()
    async with asyncio.TaskGroup() as group:
        for _ in range(qd):
            group.create_task(worker())
    elapsed = (clock() - began) / 1e9
    latencies.sort()
    ios = len(latencies)
    return PerfResult(
        pattern, io_size, qd, ctrl.io_queues, ios, elapsed, ios / elapsed, ios * io_size / elapsed / 1e6,
        percentile(latencies, 0.50) / 1e3, percentile(latencies, 0.99) / 1e3,
    )  # fmt: skip
