"""NVM command execution for one I/O queue.

RAM-backed namespaces are served inline on the event loop, reads without a copy. Namespaces whose
I/O may block (files, block devices) are served by a small thread pool, except reads the page
cache can answer at once: every other command parsed from one receive goes into one batch, the
batch runs in one worker call, and its completions come back with a single
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
SPARE_BYTES = 8 << 20  # reusable buffers one queue keeps

# One command ready to run: (opcode, cid, bdev, byte offset, byte length, data, DSM ranges).
Job = tuple[int, int, Bdev, int, int, "bytes | bytearray | memoryview | None", "list[tuple[int, int]] | None"]


def execute(job: Job) -> tuple[int, bytes | bytearray | memoryview | None]:
    """Run one validated command against its bdev; returns (status, data read or None)."""
    opc, _cid, bdev, offset, length, data, ranges = job
    try:
        if opc == READ:  # into the buffer the job carries
            bdev.readinto(offset, memoryview(data))
            return Status.SUCCESS, data
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
    except (OSError, ValueError) as e:
        return failure(bdev, opc, offset, e), None
    return Status.SUCCESS, None


def failure(bdev: Bdev, opc: int, offset: int, e: OSError | ValueError) -> int:
    """Log a bdev error; the status it completes the command with."""
    if isinstance(e, OSError):
        log.error("bdev %s: opcode 0x%02x at %d failed: %s", bdev.name, opc, offset, e)
        return Status.UNRECOVERED_READ_ERROR if opc in (READ, COMPARE) else Status.WRITE_FAULT
    log.error("bdev %s: opcode 0x%02x failed: %s", bdev.name, opc, e)  # the bdev was closed under us
    return Status.INTERNAL_ERROR


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


class BufferPool:
    """Reused data buffers, by size. A fresh large bytearray is zero-filled for nothing and, as
    glibc hands such blocks back to the kernel on free, costs a page fault per 4 KiB."""

    def __init__(self, limit: int = SPARE_BYTES):
        self._free: dict[int, list[bytearray]] = {}
        self._bytes = 0
        self._limit = limit

    def take(self, length: int) -> bytearray:
        free = self._free.get(length)
        if not free:
            return bytearray(length)
        self._bytes -= length
        return free.pop()

    def give(self, buf: bytearray) -> None:
        if self._bytes + len(buf) <= self._limit:
            self._free.setdefault(len(buf), []).append(buf)
            self._bytes += len(buf)


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
        self.buffers = BufferPool()
        self._lent: list[bytearray] = []  # read buffers queued on the connection, free after its flush

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
        if opc in (READ, WRITE):  # the hot path: what ``validate`` checks, in one go
            ns = self.namespaces.get(nsid)
            if ns is not None and self.ctrl.enabled and length <= self.max_transfer:
                bdev = ns.bdev
                nlb = (cdw12 & 0xFFFF) + 1
                slba = cdw10 | cdw11 << 32
                if slba + nlb <= bdev.num_blocks and length == nlb * bdev.block_size:
                    if opc == READ:
                        self._read(cid, bdev, slba * bdev.block_size, length)
                    else:
                        self._run((WRITE, cid, bdev, slba * bdev.block_size, length, data, None))
                    return
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

    def _read(self, cid: int, bdev: Bdev, offset: int, length: int) -> None:
        """A read answered at once when the bdev can (RAM, page cache), else by a worker."""
        buf = None
        try:
            data = bdev.view(offset, length)
            if data is None:
                buf = self.buffers.take(length)
                if not bdev.readinto_nowait(offset, memoryview(buf)):
                    self._batch.append((READ, cid, bdev, offset, length, buf, None))
                    return
                data = buf
        except (OSError, ValueError) as e:
            account(bdev.stat, READ, length, None)
            self.conn.complete(cid, failure(bdev, READ, offset, e))
            return
        account(bdev.stat, READ, length, None)
        self._send(cid, data, buf)

    def _send(self, cid: int, data: bytearray | memoryview, buf: bytearray | None) -> None:
        self.conn.send_data(cid, data)
        if buf is not None:
            self._lent.append(buf)

    def reclaim(self) -> None:
        """The connection has sent or copied everything queued: its read buffers are free again."""
        for buf in self._lent:
            self.buffers.give(buf)
        self._lent.clear()

    def _run(self, job: Job) -> None:
        """Run (or batch) any validated command but a read, which ``_read`` serves."""
        bdev = job[2]
        if bdev.blocking:
            data = job[5]
            if isinstance(data, memoryview):  # a view of the receive buffer: reused after this receive
                job = (*job[:5], bytes(data), job[6])
            self._batch.append(job)
            return
        status, _ = execute(job)
        account(bdev.stat, job[0], job[4], job[6])
        self._recycle(job[5])
        self.conn.complete(job[1], status)

    def _recycle(self, data: object) -> None:
        """R2T data arrives in a pooled bytearray (in-capsule data is a view or bytes)."""
        if type(data) is bytearray:
            self.buffers.give(data)

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

    def _batch_done(self, batch: list[Job], results: list[tuple[int, bytes | bytearray | None]]) -> None:
        conn = self.conn
        for job, (status, buf) in zip(batch, results, strict=True):
            account(job[2].stat, job[0], job[4], job[6])
            if buf is not None:
                self._send(job[1], buf, buf)
            else:
                conn.complete(job[1], status)
                self._recycle(job[5])
        conn.flush()
