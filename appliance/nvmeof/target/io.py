"""NVM command execution for one I/O queue.

RAM-backed namespaces are served inline on the event loop. Namespaces whose I/O may block (files,
block devices) are served by a small thread pool: every command parsed from one receive goes into
one batch, the batch runs in one worker call, and its completions come back with a single
``call_soon_threadsafe``, so the loop pays one wake-up per receive instead of one per command.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..spec import IoOpcode, Status
from .model import Bdev, IoStat

if TYPE_CHECKING:
    from .connection import Connection
    from .controller import Controller

log = logging.getLogger(__name__)

READ, WRITE, COMPARE = IoOpcode.READ.value, IoOpcode.WRITE.value, IoOpcode.COMPARE.value
FLUSH, WRITE_ZEROES, DSM = (
    IoOpcode.FLUSH.value,
    IoOpcode.WRITE_ZEROES.value,
    IoOpcode.DATASET_MANAGEMENT.value,
)
DATA_OPS = frozenset({READ, WRITE, COMPARE})
DSM_RANGE = struct.Struct("<IIQ")  # context attributes, length in blocks (1-based), starting LBA
DSM_DEALLOCATE = 0x4

# One command ready to run: (opcode, cid, bdev, byte offset, byte length, data, DSM ranges).
Job = tuple[int, int, Bdev, int, int, "bytes | bytearray | memoryview | None", "list[tuple[int, int]] | None"]


def execute(job: Job) -> tuple[int, bytearray | None]:
    """Run one validated command against its bdev; returns (status, data read or None)."""
    opc, _cid, bdev, offset, length, data, ranges = job
    try:
        if opc == READ:
            buf = bytearray(length)
            bdev.readinto(offset, memoryview(buf))
            return Status.SUCCESS, buf
        if opc == WRITE:
            bdev.write(offset, data)
        elif opc == COMPARE:
            buf = bytearray(length)
            bdev.readinto(offset, memoryview(buf))
            return (Status.SUCCESS if buf == data else Status.COMPARE_FAILURE), None
        elif opc == WRITE_ZEROES:
            bdev.write_zeroes(offset, length)
        elif opc == DSM:
            for start, count in ranges or ():
                bdev.deallocate(start, count)
        elif opc == FLUSH:
            bdev.flush()
    except OSError as e:
        log.error("bdev %s: opcode 0x%02x at %d failed: %s", bdev.name, opc, offset, e)
        return (Status.UNRECOVERED_READ_ERROR if opc in (READ, COMPARE) else Status.WRITE_FAULT), None
    except ValueError as e:  # the bdev was closed under us
        log.error("bdev %s: opcode 0x%02x failed: %s", bdev.name, opc, e)
        return Status.INTERNAL_ERROR, None
    return Status.SUCCESS, None


def account(stat: IoStat, opc: int, length: int, ranges: list[tuple[int, int]] | None) -> None:
    if opc == READ:
        stat.bytes_read += length
        stat.num_read_ops += 1
    elif opc == WRITE:
        stat.bytes_written += length
        stat.num_write_ops += 1
    elif opc == DSM and ranges:
        stat.bytes_unmapped += sum(count for _, count in ranges)
        stat.num_unmap_ops += 1


class IoQueue:
    """Validates and runs the NVM commands of one I/O queue, completing them on its connection."""

    def __init__(self, conn: Connection, ctrl: Controller, pool: ThreadPoolExecutor, max_transfer: int):
        self.conn = conn
        self.ctrl = ctrl
        self.namespaces = ctrl.subsystem.namespaces
        self.max_transfer = max_transfer
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._batch: list[Job] = []
        self._inflight: set[Future] = set()

    def validate(self, opc: int, nsid: int, cdw10: int, cdw11: int, cdw12: int, length: int) -> int:
        """Status for a command before any data moves; a rejected command writes nothing."""
        if not self.ctrl.enabled:
            return Status.COMMAND_SEQUENCE_ERROR
        ns = self.namespaces.get(nsid)
        if ns is None:
            return Status.INVALID_NAMESPACE
        bdev = ns.bdev
        if opc in DATA_OPS or opc == WRITE_ZEROES:
            nlb = (cdw12 & 0xFFFF) + 1
            if opc != WRITE_ZEROES and length > self.max_transfer:
                return Status.INVALID_FIELD
            if (cdw10 | cdw11 << 32) + nlb > bdev.num_blocks:
                return Status.LBA_OUT_OF_RANGE
            if opc != WRITE_ZEROES and length != nlb * bdev.block_size:
                return Status.DATA_SGL_LENGTH_INVALID
            return Status.SUCCESS
        if opc == DSM:
            return Status.DATA_SGL_LENGTH_INVALID if length < ((cdw10 & 0xFF) + 1) * 16 else Status.SUCCESS
        if opc == FLUSH:
            return Status.SUCCESS
        return Status.INVALID_OPCODE

    def submit(
        self, cid: int, opc: int, nsid: int, cdw10: int, cdw11: int, cdw12: int, length: int, data
    ) -> None:
        """Validate and run (or batch) one command; its completion goes to the connection."""
        status = self.validate(opc, nsid, cdw10, cdw11, cdw12, length)
        if status:
            self.conn.complete(cid, status)
            return
        bdev = self.namespaces[nsid].bdev
        bs = bdev.block_size
        ranges = None
        if opc == DSM:
            ranges = []
            for i in range((cdw10 & 0xFF) + 1):
                _attr, count, slba = DSM_RANGE.unpack_from(data, i * 16)
                if slba + count > bdev.num_blocks:
                    self.conn.complete(cid, Status.LBA_OUT_OF_RANGE)
                    return
                if count and cdw11 & DSM_DEALLOCATE:
                    ranges.append((slba * bs, count * bs))
            data = None
        elif opc == WRITE_ZEROES:
            length = ((cdw12 & 0xFFFF) + 1) * bs
        self._run((opc, cid, bdev, (cdw10 | cdw11 << 32) * bs, length, data, ranges))

    def _run(self, job: Job) -> None:
        bdev = job[2]
        if bdev.blocking:
            data = job[5]
            if isinstance(data, memoryview):  # a view of the receive buffer: reused after this receive
                job = (*job[:5], bytes(data), job[6])
            self._batch.append(job)
            return
        status, buf = execute(job)
        account(bdev.stat, job[0], job[4], job[6])
        if buf is not None:
            self.conn.send_data(job[1], buf)
        else:
            self.conn.complete(job[1], status)

    def flush_batch(self) -> None:
        """Hand every blocking command gathered from this receive to one worker call."""
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        future = self._pool.submit(self._work, batch)
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)

    def _work(self, batch: list[Job]) -> None:
        results = [execute(job) for job in batch]
        self._loop.call_soon_threadsafe(self._batch_done, batch, results)

    def _batch_done(self, batch: list[Job], results: list[tuple[int, bytearray | None]]) -> None:
        conn = self.conn
        for job, (status, buf) in zip(batch, results, strict=True):
            account(job[2].stat, job[0], job[4], job[6])
            if buf is not None:
                conn.send_data(job[1], buf)
            else:
                conn.complete(job[1], status)
        conn.flush()
