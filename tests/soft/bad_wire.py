"""A rig for feeding the soft target bad input: a file-backed namespace with a known pattern, a
well-behaved Kahu host doing verified I/O throughout, and checks that a raw queue got the right
C2HTermReq or status while nothing else was disturbed.

Built on ``nvme_wire.WireQueue`` (the raw test host) and the ``soft_target`` fixture of conftest.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from conftest import TEST_NQN, WIRE_HOSTNQN
from nvme_wire import WireQueue, open_controller, open_io_queue
from nvme_wire import rw_sqe as wire_rw_sqe

from appliance.nvmeof.host.controller import Controller
from appliance.nvmeof.pdu import CH, TERM, CapsuleCmd, Digests, Sqe, encode_bytes
from appliance.nvmeof.spec import SGL_DATA_BLOCK_OFFSET, SGL_TRANSPORT_DATA_BLOCK, IoOpcode, PduType

GOOD_HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6b61687a-7465-7374-0000-0000000000aa"
NSID, FUZZ_NSID = 1, 2
BS = 512
NUM_BLOCKS = 1024
GOOD_FIRST, GOOD_COUNT = 256, 256  # the good host's LBAs; bad input aims below and above them
IO_TIMEOUT = 5.0
GOOD_ROUNDS = 2  # verified write+read rounds the good host must finish at every checkpoint


def pattern(length: int, seed: int = 7) -> bytes:
    """Deterministic, non-zero-looking content the backing file starts with."""
    return random.Random(seed).randbytes(length)


def bad_input_config(tmp_path: Path) -> tuple[dict[str, Any], Path, bytes]:
    """Target config: a pre-filled file namespace and a RAM one (512-byte blocks) for WIRE and GOOD hosts."""
    image = tmp_path / "bad-input.img"
    content = pattern(NUM_BLOCKS * BS)
    image.write_bytes(content)
    config = {
        "subsystems": [
            {
                "nqn": TEST_NQN,
                "hosts": [WIRE_HOSTNQN, GOOD_HOSTNQN],
                "listeners": [{"traddr": "127.0.0.1", "trsvcid": "0"}],
                "namespaces": [
                    {"file": str(image), "size": len(content), "block_size": BS},
                    {"malloc": "1MiB", "block_size": BS},  # FUZZ_NSID: where fuzzed writes go
                ],
            }
        ]
    }
    return config, image, content


class GoodHost:
    """The product host writing and reading back random data in its own LBA range, non-stop."""

    def __init__(self, ctrl: Controller, seed: int = 99):
        self.ctrl = ctrl
        self.cntlid = ctrl.cntlid
        self.rounds = 0
        self._rng = random.Random(seed)
        self._progress = asyncio.Event()
        self._stop = False
        self.task = asyncio.create_task(self._loop(), name="good host")
        self.task.add_done_callback(lambda _: self._progress.set())

    async def _loop(self) -> None:
        while not self._stop:
            nlb = self._rng.choice((1, 8, 32))  # in-capsule and R2T writes
            lba = GOOD_FIRST + self._rng.randrange(GOOD_COUNT - nlb)
            data = self._rng.randbytes(nlb * BS)
            async with asyncio.timeout(IO_TIMEOUT):
                await self.ctrl.write(NSID, lba, data)
                back = bytearray(len(data))
                await self.ctrl.read(NSID, lba, back)
            assert back == data, f"good host read back other data at LBA {lba}"
            self.rounds += 1
            self._progress.set()

    async def checkpoint(self) -> None:
        """Wait until the good host completed GOOD_ROUNDS more verified rounds on its first connection."""
        goal = self.rounds + GOOD_ROUNDS
        async with asyncio.timeout(IO_TIMEOUT):
            while self.rounds < goal:
                if self.task.done():
                    self.task.result()
                    raise AssertionError("the good host stopped")
                self._progress.clear()
                await self._progress.wait()
        assert self.ctrl.reconnects == 0, "the good host's connection was dropped and rebuilt"
        assert self.ctrl.cntlid == self.cntlid

    async def stop(self) -> None:
        self._stop = True
        with contextlib.suppress(Exception):
            await self.task
        await self.ctrl.close()


class Rig:
    """One soft target with the good host running, and the raw queues a test opened."""

    def __init__(self, target: Any, image: Path, content: bytes, good: GoodHost):
        self.target = target
        self.port: int = target.io_port
        self.image = image
        self.expected = bytearray(content)  # what the bad hosts' LBAs must still hold
        self.good = good
        self.loop_errors: list[dict[str, Any]] = []
        self._queues: list[WireQueue] = []

    # ------------------------------------------------------------------ raw queues

    def track(self, queue: WireQueue) -> WireQueue:
        self._queues.append(queue)
        return queue

    async def raw(self, **kw: Any) -> WireQueue:
        """A TCP connection; ``icreq=False`` leaves it before the ICReq."""
        return self.track(await WireQueue.open(self.port, **kw))

    async def admin(self, **kw: Any) -> WireQueue:
        """An enabled admin queue of a new controller for WIRE_HOSTNQN."""
        return self.track(await open_controller(self.port, TEST_NQN, **kw))

    async def io(self, **kw: Any) -> WireQueue:
        """I/O queue 1 of a new controller (whose admin queue is kept open by the rig)."""
        admin = await self.admin(**kw)
        return self.track(await open_io_queue(self.port, TEST_NQN, admin.cntlid, **kw))

    async def close_queues(self) -> None:
        for queue in self._queues:
            with contextlib.suppress(OSError):
                await queue.close()
        self._queues.clear()

    # ------------------------------------------------------------------ checks

    async def expect_term(
        self, queue: WireQueue, offending: bytes, allowed: tuple[tuple[int, int | None], ...]
    ) -> tuple[int, int]:
        """The next PDU is a well-formed C2HTermReq with an allowed (FES, FEI), then the target closes.

        ``offending`` is the PDU the target should blame: its header copy must be a prefix of it.
        An FEI of None means the field is not defined for that FES and is not checked.
        """
        async with asyncio.timeout(IO_TIMEOUT):
            raw = await queue.recv_raw()
            closed = await queue.closed_by_peer()
        ptype, flags, hlen, pdo, plen = CH.unpack_from(raw)
        assert ptype == PduType.C2H_TERM_REQ, (
            f"expected C2HTermReq, got PDU type 0x{ptype:02x}: {raw[:32].hex()}"
        )
        assert (flags, hlen, pdo) == (0, 24, 0), f"TermReq header flags={flags} hlen={hlen} pdo={pdo}"
        assert 24 <= plen <= 152 and plen == len(raw), f"TermReq PLEN {plen}"
        fes, fei = TERM.unpack_from(raw)[5:7]
        assert any(fes == f and (i is None or fei == i) for f, i in allowed), (
            f"TermReq FES 0x{fes:02x} FEI {fei}, expected one of {allowed}"
        )
        copy = raw[24:]
        assert len(copy) <= 128 and offending.startswith(copy), (
            f"copied header {copy.hex()} is not a prefix of the offending PDU {offending[:128].hex()}"
        )
        assert closed, "the target kept the connection open after its TermReq"
        return fes, fei

    async def check(self) -> None:
        """The good host kept going, the bad hosts' blocks are intact and the event loop saw no errors."""
        await self.good.checkpoint()
        assert_backing(self.image, self.expected)
        assert not self.loop_errors, f"target raised: {self.loop_errors}"

    async def wait_controllers(self, count: int) -> None:
        """Wait (bounded) until the subsystem has ``count`` controllers left, e.g. after a disconnect."""
        sub = self.target.server.target.subsystem(TEST_NQN)
        async with asyncio.timeout(IO_TIMEOUT):
            while len(self.target.server.controllers(sub)) != count:
                await asyncio.sleep(0.01)


def assert_backing(image: Path, expected: bytes | bytearray) -> None:
    """The file matches ``expected`` everywhere but the good host's range."""
    actual = image.read_bytes()
    good = slice(GOOD_FIRST * BS, (GOOD_FIRST + GOOD_COUNT) * BS)
    outside = [(0, GOOD_FIRST * BS), (good.stop, NUM_BLOCKS * BS)]
    for start, end in outside:
        if actual[start:end] != expected[start:end]:
            first = next(i for i in range(start, end) if actual[i] != expected[i])
            raise AssertionError(f"backing file changed at byte {first} (LBA {first // BS})")


@contextlib.asynccontextmanager
async def bad_input_rig(soft_target: Callable, tmp_path: Path) -> AsyncIterator[Rig]:
    """The target, the good host doing verified I/O, loop-error capture; everything closed on exit."""
    config, image, content = bad_input_config(tmp_path)
    async with soft_target(config) as target:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        ctrl = await asyncio.wait_for(
            Controller.connect("127.0.0.1", target.io_port, TEST_NQN, hostnqn=GOOD_HOSTNQN), IO_TIMEOUT
        )
        good = GoodHost(ctrl)
        rig = Rig(target, image, content, good)
        rig.loop_errors = errors
        try:
            await good.checkpoint()
            yield rig
            await rig.check()
        finally:
            await rig.close_queues()
            await good.stop()
            loop.set_exception_handler(None)


# ---------------------------------------------------------------------- building (bad) PDUs


def rw_sqe(opcode: int, slba: int, nlb: int, *, cid: int = 0x1234, nsid: int = NSID) -> Sqe:
    """``nvme_wire.rw_sqe`` with this rig's defaults; the SGL is filled in by :func:`capsule`."""
    return wire_rw_sqe(opcode, slba, nlb, cid=cid, nsid=nsid)


def capsule(dg: Digests, sqe: Sqe, data: bytes = b"", *, sgl_len: int | None = None,
            sgl_id: int | None = None, sgl_addr: int = 0) -> bytes:  # fmt: skip
    """A CapsuleCmd framed with digests ``dg``; in-capsule SGL when ``data`` is given."""
    sqe.sgl_id = (
        sgl_id if sgl_id is not None else (SGL_DATA_BLOCK_OFFSET if data else SGL_TRANSPORT_DATA_BLOCK)
    )
    sqe.sgl_len = sgl_len if sgl_len is not None else len(data)
    sqe.sgl_addr = sgl_addr
    return encode_bytes(CapsuleCmd(sqe, data), dg)


def patch(blob: bytes, offset: int, fmt: str, value: int) -> bytes:
    """``blob`` with one little-endian field replaced."""
    out = bytearray(blob)
    struct.pack_into("<" + fmt, out, offset, value)
    return bytes(out)


def write_sqe(slba: int, nlb: int, cid: int = 0x1234) -> Sqe:
    return rw_sqe(IoOpcode.WRITE, slba, nlb, cid=cid)
