"""NVM I/O through the soft target: in-capsule and R2T writes, reads with and without SUCCESS,
digests, compare, write zeroes, deallocate, flush, validation, file-backed namespaces, many queues,
zero-copy reads behind a full socket, file reads that miss the page cache."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest
from conftest import TEST_NQN, default_target_config, run
from nvme_wire import open_controller, open_io_queue, open_queues

from appliance.nvmeof.pdu import CapsuleCmd, Sqe, encode
from appliance.nvmeof.spec import IoOpcode, Status

RAM_NS, FILE_NS = 1, 2  # 512-byte blocks in RAM, 4096-byte blocks in a file


def test_in_capsule_and_r2t_writes_read_back(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            admin, q = await open_queues(t.io_port, TEST_NQN)
            small = os.urandom(4096)
            assert (await q.write(RAM_NS, 8, small, 512)).status == 0
            assert not q.r2ts  # 4 KiB fits in the capsule
            big = os.urandom(128 * 1024)
            assert (await q.write(RAM_NS, 100, big, 512, in_capsule=False)).status == 0
            [r2t] = q.r2ts
            assert (r2t.r2to, r2t.r2tl) == (0, len(big)) and r2t.ttag != 0
            q.h2c_chunk = 16384  # the same write, split into 8 H2CData PDUs
            assert (await q.write(FILE_NS, 3, big, 4096, in_capsule=False)).status == 0
            back = await q.read(RAM_NS, 8, 8, 512)
            assert back.c2h_success and back.data == small
            assert (await q.read(RAM_NS, 100, 256, 512)).data == big
            assert (await q.read(FILE_NS, 3, 32, 4096)).data == big
            await q.close()
            await admin.close()

    run(scenario())


def test_reads_without_success_flag(soft_target, tmp_path) -> None:
    config = default_target_config(tmp_path)
    config["transport"]["c2h_success"] = False

    async def scenario() -> None:
        async with soft_target(config) as t:
            admin, q = await open_queues(t.io_port, TEST_NQN)
            data = os.urandom(8192)
            assert (await q.write(FILE_NS, 0, data, 4096, in_capsule=False)).status == 0
            back = await q.read(FILE_NS, 0, 2, 4096)
            assert not back.c2h_success and back.status == 0 and back.data == data
            await q.close()
            await admin.close()

    run(scenario())


def test_header_and_data_digests(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            admin, q = await open_queues(t.io_port, TEST_NQN, hdgst=True, ddgst=True)
            data = os.urandom(16384)
            assert (await q.write(FILE_NS, 1, data, 4096, in_capsule=False)).status == 0
            assert (await q.write(RAM_NS, 0, data[:4096], 512)).status == 0
            assert (await q.read(FILE_NS, 1, 4, 4096)).data == data
            # A corrupted data digest fails only that command, with Data Transfer Error, writing nothing.
            sqe = Sqe(IoOpcode.WRITE, cid=q.next_cid(), nsid=RAM_NS, cdw12=7, sgl_id=0x01, sgl_len=4096)
            wire = b"".join(bytes(p) for p in encode(CapsuleCmd(sqe, b"\xee" * 4096), q.dg))
            await q.send_raw(wire[:-4] + bytes(4))
            assert (await q.wait(sqe.cid)).status == Status.DATA_TRANSFER_ERROR
            assert (await q.read(RAM_NS, 0, 8, 512)).data == data[:4096]
            await q.close()
            await admin.close()

    run(scenario())


def test_compare_write_zeroes_deallocate_flush(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            admin, q = await open_queues(t.io_port, TEST_NQN)
            for nsid, bs in ((RAM_NS, 512), (FILE_NS, 4096)):
                data = os.urandom(4 * bs)
                small = len(data) <= 4096
                assert (await q.write(nsid, 10, data, bs, in_capsule=small)).status == 0
                same = Sqe(IoOpcode.COMPARE, cid=q.next_cid(), nsid=nsid, cdw10=10, cdw12=3)
                assert (await q.command(same, data, in_capsule=small)).status == 0
                differ = Sqe(IoOpcode.COMPARE, cid=q.next_cid(), nsid=nsid, cdw10=10, cdw12=3)
                assert (
                    await q.command(differ, bytes(4 * bs), in_capsule=small)
                ).status == Status.COMPARE_FAILURE
                zeroes = Sqe(IoOpcode.WRITE_ZEROES, cid=q.next_cid(), nsid=nsid, cdw10=11, cdw12=0)
                assert (await q.command(zeroes)).status == 0
                back = (await q.read(nsid, 10, 4, bs)).data
                assert back == data[:bs] + bytes(bs) + data[2 * bs :]
                ranges = struct.pack("<IIQ", 0, 2, 12) + struct.pack("<IIQ", 0, 0, 0)  # 1-based lengths
                dsm = Sqe(IoOpcode.DATASET_MANAGEMENT, cid=q.next_cid(), nsid=nsid, cdw10=1, cdw11=0x4)
                assert (await q.command(dsm, ranges)).status == 0
                assert (await q.read(nsid, 10, 4, bs)).data == data[:bs] + bytes(3 * bs)
                flush = Sqe(IoOpcode.FLUSH, cid=q.next_cid(), nsid=nsid)
                assert (await q.command(flush)).status == 0
            await q.close()
            await admin.close()

    run(scenario())


def test_rejected_commands_write_nothing(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            admin, q = await open_queues(t.io_port, TEST_NQN)
            nblocks = 16 * 1024 * 1024 // 512
            tail = os.urandom(512)
            assert (await q.write(RAM_NS, nblocks - 1, tail, 512)).status == 0
            over = await q.write(RAM_NS, nblocks - 1, bytes(1024), 512)
            assert over.status == Status.LBA_OUT_OF_RANGE
            assert (await q.read(RAM_NS, nblocks - 1, 1, 512)).data == tail
            bad_len = Sqe(IoOpcode.WRITE, cid=q.next_cid(), nsid=RAM_NS, cdw10=nblocks - 1, cdw12=0)
            assert (await q.command(bad_len, bytes(1024))).status == Status.DATA_SGL_LENGTH_INVALID
            assert (await q.read(RAM_NS, nblocks - 1, 1, 512)).data == tail
            assert (await q.read(9, 0, 1, 512)).status == Status.INVALID_NAMESPACE
            huge = Sqe(IoOpcode.READ, cid=q.next_cid(), nsid=RAM_NS, cdw12=511)
            assert (await q.command(huge, read_len=256 * 1024)).status == Status.INVALID_FIELD
            odd = Sqe(0x7C, cid=q.next_cid(), nsid=RAM_NS)
            assert (await q.command(odd)).status == Status.INVALID_OPCODE
            too_big = Sqe(IoOpcode.WRITE, cid=q.next_cid(), nsid=RAM_NS, cdw12=15)
            assert (await q.command(too_big, bytes(8192))).status == Status.DATA_SGL_LENGTH_INVALID
            range_bad = struct.pack("<IIQ", 0, 4, nblocks - 2)
            dsm = Sqe(IoOpcode.DATASET_MANAGEMENT, cid=q.next_cid(), nsid=RAM_NS, cdw10=0, cdw11=0x4)
            assert (await q.command(dsm, range_bad)).status == Status.LBA_OUT_OF_RANGE
            assert (await q.read(RAM_NS, nblocks - 1, 1, 512)).data == tail
            await q.close()
            await admin.close()

    run(scenario())


def test_many_queues_pipelined(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            admin = await open_controller(t.io_port, TEST_NQN)
            queues = [await open_io_queue(t.io_port, TEST_NQN, admin.cntlid, qid=i) for i in range(1, 5)]
            blocks = {}
            for i, q in enumerate(queues):  # 32 writes in flight per queue, some to the file namespace
                cids = []
                for j in range(32):
                    lba = i * 32 + j
                    blocks[lba] = os.urandom(4096)
                    sqe = Sqe(IoOpcode.WRITE, cid=q.next_cid(), nsid=FILE_NS, cdw10=lba, cdw12=0)
                    cids.append(await q.submit(sqe, blocks[lba]))
                for cid in cids:
                    assert (await q.wait(cid)).status == 0

            async def read_all(i: int, q) -> None:
                cids = {}
                for j in range(32):
                    sqe = Sqe(IoOpcode.READ, cid=q.next_cid(), nsid=FILE_NS, cdw10=i * 32 + j, cdw12=0)
                    cids[await q.submit(sqe, read_len=4096)] = i * 32 + j
                for cid, lba in cids.items():
                    assert (await q.wait(cid)).data == blocks[lba]

            async with asyncio.TaskGroup() as tg:
                for i, q in enumerate(queues):
                    tg.create_task(read_all(i, q))
            for q in queues:
                await q.close()
            await admin.close()

    run(scenario())


def run_on(loop: str, coro) -> None:
    run(coro, runner=pytest.importorskip("uvloop").run if loop == "uvloop" else asyncio.run)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_reads_queued_behind_a_full_socket_keep_their_data(soft_target, loop) -> None:
    """RAM reads go out as views of the bdev: what the socket cannot take at once must be a copy,
    or a write executed after the reads would change data they still have to send."""

    async def scenario() -> None:
        async with soft_target() as t:
            admin, q = await open_queues(t.io_port, TEST_NQN)
            for conn in t.server._connections:  # keep reading commands however much output waits
                conn.transport.set_write_buffer_limits(high=64 << 20)
            old = os.urandom(128 * 1024)
            assert (await q.write(RAM_NS, 0, old, 512, in_capsule=False)).status == 0
            cids = []
            for _ in range(64):  # 8 MiB the test does not take yet: the target's socket fills up
                sqe = Sqe(IoOpcode.READ, cid=q.next_cid(), nsid=RAM_NS, cdw12=255)
                cids.append(await q.submit(sqe, read_len=len(old)))
            await asyncio.sleep(0.2)  # the target executes them all, in this loop
            new = os.urandom(4096)  # the last 4 KiB of each read: still queued in the target
            write = Sqe(IoOpcode.WRITE, cid=q.next_cid(), nsid=RAM_NS, cdw10=248, cdw12=7)
            write_cid = await q.submit(write, new)
            for cid in cids:
                assert (await q.wait(cid)).data == old
            assert (await q.wait(write_cid)).status == 0
            assert (await q.read(RAM_NS, 0, 256, 512)).data == old[:-4096] + new
            await q.close()
            await admin.close()

    run_on(loop, scenario())


def test_file_reads_missing_the_page_cache(soft_target, tmp_path) -> None:
    """Reads the page cache cannot answer at once are done by a worker thread instead."""

    async def scenario() -> None:
        async with soft_target() as t:
            admin, q = await open_queues(t.io_port, TEST_NQN)
            data = os.urandom(256 * 1024)
            for i in range(2):
                chunk = data[i * 131072 : (i + 1) * 131072]
                assert (await q.write(FILE_NS, i * 32, chunk, 4096, in_capsule=False)).status == 0
            assert (await q.command(Sqe(IoOpcode.FLUSH, cid=q.next_cid(), nsid=FILE_NS))).status == 0
            fd = os.open(tmp_path / "ns2.img", os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            cids = {}
            for i in range(16):  # pipelined, so cached and uncached reads share receives
                sqe = Sqe(IoOpcode.READ, cid=q.next_cid(), nsid=FILE_NS, cdw10=i * 4, cdw12=3)
                cids[await q.submit(sqe, read_len=16384)] = i
            for cid, i in cids.items():
                assert (await q.wait(cid)).data == data[i * 16384 : (i + 1) * 16384]
            await q.close()
            await admin.close()

    run(scenario())
