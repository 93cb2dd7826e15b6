"""The Kahu NVMe/TCP host against the in-process soft target, through real loopback sockets.

Each test builds its own target (conftest's ``serve_bdevs``) so transport options (digests, SUCCESS
flag, in-capsule size) can differ per test; data is checked both through the host and in the
target's bdev.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator

import pytest
from conftest import TEST_NQN, run, serve_bdevs

from appliance.nvmeof.host import Controller, NvmeError, discover
from appliance.nvmeof.host.queue import Queue
from appliance.nvmeof.spec import IoOpcode, Status
from appliance.nvmeof.target.model import Bdev, MallocBdev
from appliance.nvmeof.target.server import TargetServer

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6b61687a-686f-7374-0000-000000000001"


@contextlib.asynccontextmanager
async def connected(
    bdevs: list[Bdev] | None = None, connect: dict | None = None, **transport
) -> AsyncIterator[tuple[TargetServer, Controller]]:
    """``serve_bdevs`` plus a connected controller, closed before the target stops."""
    async with contextlib.AsyncExitStack() as stack:
        server, port = await stack.enter_async_context(serve_bdevs(bdevs, **transport))
        ctrl = await Controller.connect("127.0.0.1", port, TEST_NQN, **(connect or {}))
        stack.push_async_callback(ctrl.close)
        yield server, ctrl


def bdev_bytes(server: TargetServer, name: str, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    server.target.bdevs[name].readinto(offset, memoryview(buf))
    return bytes(buf)


def test_identify_and_namespaces() -> None:
    """The bring-up yields the controller's identify data and both namespaces with their IDs."""

    async def body():
        bdevs = [MallocBdev("m0", 512, 16384), MallocBdev("m1", 4096, 1024)]
        async with connected(bdevs, connect={"hostnqn": HOSTNQN}) as (server, ctrl):
            sub = server.target.subsystem(TEST_NQN)
            assert ctrl.identify.subnqn == TEST_NQN
            assert ctrl.identify.sn == "KAHUHOST0001"
            assert ctrl.cntlid == ctrl.identify.cntlid
            assert [c.cntlid for c in server.controllers(sub)] == [ctrl.cntlid]
            assert server.controllers(sub)[0].hostnqn == HOSTNQN
            assert ctrl.kato == 10000
            ns1, ns2 = ctrl.namespaces[1], ctrl.namespaces[2]
            assert (ns1.block_size, ns1.num_blocks) == (512, 16384)
            assert (ns2.block_size, ns2.num_blocks) == (4096, 1024)
            assert ns1.uuid == sub.namespaces[1].uuid
            assert ns2.nguid == sub.namespaces[2].nguid
            assert ns1.nguid != ns2.nguid

    run(body())


def test_multi_queue_pipelined_io_is_verified() -> None:
    """256 concurrent writes then reads over 4 queues at QD 32 land where they should."""

    async def body():
        async with connected(connect={"io_queues": 4, "queue_depth": 32}) as (server, ctrl):
            assert ctrl.io_queues == 4
            blocks = random.sample(range(0, 16384, 8), 256)
            data = {lba: os.urandom(4096) for lba in blocks}
            await asyncio.gather(*(ctrl.write(1, lba, data[lba]) for lba in blocks))
            bufs = {lba: bytearray(4096) for lba in blocks}
            reads = [asyncio.ensure_future(ctrl.read(1, lba, bufs[lba])) for lba in blocks]
            await asyncio.sleep(0)  # every read has been submitted before any completes
            outstanding = [q.outstanding for q in ctrl._io]
            await asyncio.gather(*reads)
            assert all(bufs[lba] == data[lba] for lba in blocks)
            assert all(bdev_bytes(server, "m0", lba * 512, 4096) == data[lba] for lba in blocks)
            assert outstanding == [32, 32, 32, 32]  # flow control caps each queue at its depth

    run(body())


def test_in_capsule_and_r2t_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes up to IOCCSZ*16-64 go in-capsule; bigger ones answer an R2T with H2CData split by MAXH2CDATA."""
    r2ts: list[tuple[int, int]] = []
    original = Queue._send_h2c

    def spy(self, cid, ttag, src, offset, length):
        r2ts.append((offset, length))
        original(self, cid, ttag, src, offset, length)

    monkeypatch.setattr(Queue, "_send_h2c", spy)

    async def body():
        async with connected(in_capsule_data_size=8192) as (server, ctrl):
            assert ctrl.identify.ioccsz * 16 - 64 == 8192
            small = os.urandom(8192)
            await ctrl.write(1, 0, small)
            assert r2ts == []
            big = os.urandom(64 * 1024)
            await ctrl.write(1, 100, big)
            assert r2ts == [(0, 64 * 1024)]
            ctrl._io[0].maxh2cdata = 8192  # force several H2CData PDUs for one R2T
            bigger = os.urandom(96 * 1024)
            await ctrl.write(1, 300, bigger)
            assert bdev_bytes(server, "m0", 0, 8192) == small
            assert bdev_bytes(server, "m0", 100 * 512, len(big)) == big
            assert bdev_bytes(server, "m0", 300 * 512, len(bigger)) == bigger

    run(body())


@pytest.mark.parametrize("c2h_success", [True, False], ids=["success-flag", "capsule-resp"])
def test_read_completion_styles(c2h_success: bool) -> None:
    """Reads complete whether the target ends them with C2HData SUCCESS or with a CapsuleResp."""

    async def body():
        async with serve_bdevs(c2h_success=c2h_success) as (server, port):
            pattern = os.urandom(1 << 20)
            server.target.bdevs["m0"].write(0, pattern)
            async with await Controller.connect("127.0.0.1", port, TEST_NQN, io_queues=2) as ctrl:
                buf = bytearray(len(pattern))  # 1 MiB: split into MDTS-sized commands
                await ctrl.read(1, 0, buf)
                assert buf == pattern
                small = [bytearray(512) for _ in range(64)]
                await asyncio.gather(*(ctrl.read(1, i * 3, b) for i, b in enumerate(small)))
                assert all(b == pattern[i * 3 * 512 : i * 3 * 512 + 512] for i, b in enumerate(small))

    run(body())


def test_header_and_data_digests() -> None:
    """With both digests negotiated, in-capsule writes, R2T writes and multi-PDU reads round-trip."""

    async def body():
        async with connected(connect={"hdgst": True, "ddgst": True}) as (server, ctrl):
            assert ctrl.digests == (True, True)
            assert all(q.digests == (True, True) for q in ctrl._io)
            for lba, size in ((0, 4096), (64, 128 * 1024), (1024, 512 * 1024)):
                data = os.urandom(size)
                await ctrl.write(1, lba, data)
                back = bytearray(size)
                await ctrl.read(1, lba, back)
                assert back == data
                assert bdev_bytes(server, "m0", lba * 512, size) == data

    run(body())


def test_write_zeroes_deallocate_compare_flush() -> None:
    async def body():
        async with connected() as (_, ctrl):
            data = os.urandom(64 * 512)
            await ctrl.write(1, 0, data)
            await ctrl.write_zeroes(1, 8, 8)
            await ctrl.deallocate(1, [(32, 4), (40, 2)])
            await ctrl.flush(1)
            back = bytearray(len(data))
            await ctrl.read(1, 0, back)
            expected = bytearray(data)
            for slba, nlb in ((8, 8), (32, 4), (40, 2)):
                expected[slba * 512 : (slba + nlb) * 512] = bytes(nlb * 512)
            assert back == expected
            await ctrl.compare(1, 0, data[:4096])
            with pytest.raises(NvmeError) as failed:
                await ctrl.compare(1, 8, data[8 * 512 : 16 * 512])
            assert failed.value.status == Status.COMPARE_FAILURE

    run(body())


def test_lba_out_of_range_is_an_nvme_error() -> None:
    async def body():
        async with serve_bdevs() as (_, port), await Controller.connect("127.0.0.1", port, TEST_NQN) as ctrl:
            with pytest.raises(NvmeError) as failed:
                await ctrl.read(1, 16384 - 1, bytearray(1024))
            assert failed.value.status == Status.LBA_OUT_OF_RANGE
            assert "READ" in str(failed.value) and "LBA_OUT_OF_RANGE" in str(failed.value)
            buf = bytearray(512)  # the queue is still usable afterwards
            await ctrl.read(1, 16384 - 1, buf)

    run(body())


def test_start_io_callbacks() -> None:
    """``start_io``: fast-path writes/reads, MDTS-split ones (slow path) and errors all reach ``done``."""

    async def body():
        async with connected(connect={"io_queues": 2, "queue_depth": 4}, c2h_success=True) as (server, ctrl):
            loop = asyncio.get_running_loop()
            ended: dict[object, asyncio.Future] = {}

            def done(ctx: object, error: BaseException | None) -> None:
                ended[ctx].set_result(error)

            def start(opcode: IoOpcode, lba: int, buf, ctx: object) -> asyncio.Future:
                ended[ctx] = loop.create_future()
                ctrl.start_io(opcode, 1, lba, buf, done, ctx)
                return ended[ctx]

            data = {lba: os.urandom(4096) for lba in range(0, 16 * 8, 8)}  # 16 I/Os on 8 slots
            assert (
                await asyncio.gather(*(start(IoOpcode.WRITE, lba, d, lba) for lba, d in data.items()))
                == [None] * 16
            )
            bufs = {lba: bytearray(4096) for lba in data}
            await asyncio.gather(*(start(IoOpcode.READ, lba, bufs[lba], ("r", lba)) for lba in data))
            assert all(bufs[lba] == data[lba] for lba in data)
            big = bytearray(1 << 20)  # above MDTS: split, through a task
            assert await start(IoOpcode.READ, 0, big, "big") is None
            assert big[: 16 * 4096] == b"".join(data.values())
            error = await start(IoOpcode.READ, 16384 - 1, bytearray(1024), "bad")
            assert isinstance(error, NvmeError) and error.status == Status.LBA_OUT_OF_RANGE
            with pytest.raises(ValueError):
                ctrl.start_io(IoOpcode.FLUSH, 1, 0, bytearray(512), done)
            assert bdev_bytes(server, "m0", 0, 4096) == data[0]

    run(body())


def test_raising_completion_callback_leaves_the_queue_working() -> None:
    async def body():
        async with connected() as (_, ctrl):
            loop = asyncio.get_running_loop()
            reported: list[dict] = []
            loop.set_exception_handler(lambda _, context: reported.append(context))
            ctrl.start_io(IoOpcode.READ, 1, 0, bytearray(512), lambda ctx, error: 1 / 0)
            buf = bytearray(512)
            await ctrl.read(1, 0, buf)
            assert len(reported) == 1 and isinstance(reported[0]["exception"], ZeroDivisionError)

    run(body())


def test_connect_errors_name_the_nqn() -> None:
    async def body():
        async with serve_bdevs(hosts=[HOSTNQN]) as (_, port):
            wrong = "nqn.2026-11.io.kahu:no-such-subsystem"
            with pytest.raises(NvmeError) as failed:
                await Controller.connect("127.0.0.1", port, wrong, hostnqn=HOSTNQN)
            assert failed.value.status == Status.CONNECT_INVALID_PARAMETERS
            assert wrong in str(failed.value) and "SUBNQN" in str(failed.value)
            stranger = "nqn.2014-08.org.nvmexpress:uuid:6b61687a-686f-7374-0000-0000000000ff"
            with pytest.raises(NvmeError) as refused:
                await Controller.connect("127.0.0.1", port, TEST_NQN, hostnqn=stranger)
            assert refused.value.status == Status.CONNECT_INVALID_HOST
            assert stranger in str(refused.value)

    run(body())


def test_discovery_lists_the_subsystem() -> None:
    async def body():
        async with serve_bdevs() as (_, port):
            entries = await discover("127.0.0.1", port, hostnqn=HOSTNQN)
        nvm = [e for e in entries if e.subnqn == TEST_NQN]
        assert len(nvm) == 1
        assert (nvm[0].traddr, int(nvm[0].trsvcid)) == ("127.0.0.1", port)
        assert nvm[0].subtype == 2

    run(body())


def test_connect_discovered_entry() -> None:
    async def body():
        async with serve_bdevs() as (_, port):
            entry = next(e for e in await discover("127.0.0.1", port) if e.subnqn == TEST_NQN)
            async with await Controller.connect_discovered(entry) as ctrl:
                assert ctrl.identify.subnqn == TEST_NQN and 1 in ctrl.namespaces

    run(body())


def test_namespace_change_event_rescans() -> None:
    """Adding a namespace on the target raises an AEN; the host reads the log and rescans."""

    async def body():
        async with connected() as (server, ctrl):
            assert list(ctrl.namespaces) == [1]
            changed = ctrl.namespace_change()
            server.target.add_bdev(MallocBdev("m1", 4096, 256))
            server.target.add_namespace(TEST_NQN, "m1")
            await changed
            assert sorted(ctrl.namespaces) == [1, 2]
            assert ctrl.namespaces[2].block_size == 4096
            assert ctrl.events and ctrl.events[-1] & 0x7 == 2  # a notice

    run(body())
