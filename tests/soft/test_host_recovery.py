"""The host's failure handling: keep-alive, reconnect after a target restart, timeouts, C2HTermReq.

Timeouts and termination requests use a scripted fake controller on a real socket, so the target
misbehaves exactly when the test wants it to.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from conftest import TEST_NQN, run, serve_bdevs
from ports import free_port

from appliance.nvmeof.host import Controller, NvmeTimeout, NvmeTransportError
from appliance.nvmeof.host.queue import Queue
from appliance.nvmeof.pdu import ICResp, Sqe, TermReq, encode
from appliance.nvmeof.spec import AdminOpcode, Fes
from appliance.nvmeof.target.model import FileBdev

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def test_keep_alive_keeps_idle_controller_past_kato() -> None:
    """Idle for 2.5 x KATO: the target keeps the controller because the host sends Keep Alive."""

    async def body():
        async with serve_bdevs(kas=1) as (server, port):
            sub = server.target.subsystem(TEST_NQN)
            async with await Controller.connect("127.0.0.1", port, TEST_NQN, kato_ms=1000) as ctrl:
                assert ctrl.kato == 1000
                [target_ctrl] = server.controllers(sub)
                await asyncio.sleep(2.5)  # the idle period under test, not a synchronisation
                assert server.controllers(sub) == [target_ctrl] and not target_ctrl.destroyed
                assert ctrl.reconnects == 0
                await ctrl.read(1, 0, bytearray(512))

    run(body())


def test_without_keep_alive_the_target_drops_and_host_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Control for the test above: with Keep Alive suppressed the target expires the controller."""

    async def silent(self, session) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(Controller, "_keep_alive", silent)

    async def body():
        async with serve_bdevs(kas=1) as (server, port):
            sub = server.target.subsystem(TEST_NQN)
            async with await Controller.connect("127.0.0.1", port, TEST_NQN, kato_ms=1000) as ctrl:
                first = ctrl.cntlid
                await asyncio.sleep(2.5)
                assert ctrl.reconnects >= 1
                assert ctrl.cntlid != first
                assert ctrl.cntlid in [c.cntlid for c in server.controllers(sub)]

    run(body())


def test_reconnect_after_target_restart(tmp_path: Path) -> None:
    """Stop the target, issue a read while it is down, restart it on the same port: the read completes."""
    backing = tmp_path / "ns1.img"
    backing.write_bytes(bytes(4 << 20))
    data = os.urandom(64 * 1024)
    port = free_port()

    async def scenario():
        async with serve_bdevs([FileBdev("f0", str(backing), 512)], port=port):
            ctrl = await Controller.connect("127.0.0.1", port, TEST_NQN, io_queues=2, reconnect_timeout=20)
            await ctrl.write(1, 128, data)
        buf = bytearray(len(data))
        # The target is gone now: this read fails on the dead queues and waits for the reconnect.
        reading = asyncio.create_task(ctrl.read(1, 128, buf))
        try:
            async with serve_bdevs([FileBdev("f0", str(backing), 512)], port=port) as (server, _):
                await reading  # re-issued on the new queues

                assert buf == data
                assert ctrl.reconnects == 1 and ctrl.io_queues == 2
                sub = server.target.subsystem(TEST_NQN)
                assert [c.cntlid for c in server.controllers(sub)] == [ctrl.cntlid]
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            await ctrl.close()

    run(scenario(), timeout=30)  # above the host's reconnect_timeout


@contextlib.asynccontextmanager
async def fake_controller(script: Script) -> AsyncIterator[int]:
    """A TCP listener that runs ``script`` per connection; yields its port."""
    handlers: set[asyncio.Task] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await script(reader, writer)
            await reader.read()  # hold the connection until the host closes it
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
        if handlers:
            _, late = await asyncio.wait(handlers, timeout=5)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)


async def answer_icreq(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(128)
    writer.writelines(encode(ICResp(maxh2cdata=131072)))
    await writer.drain()


async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accepts the connection and never answers."""


def test_no_icresp_times_out() -> None:
    async def body():
        async with fake_controller(mute) as port:
            with pytest.raises(NvmeTimeout) as failed:
                await Controller.connect("127.0.0.1", port, TEST_NQN, timeout=0.3)
        assert "ICResp" in str(failed.value)
        assert isinstance(failed.value, TimeoutError)

    run(body())


def test_unanswered_command_times_out() -> None:
    """ICResp comes back, the Connect never does: the command fails with NvmeTimeout naming it."""

    async def body():
        async with fake_controller(answer_icreq) as port:
            with pytest.raises(NvmeTimeout) as failed:
                await Controller.connect("127.0.0.1", port, TEST_NQN, timeout=0.3)
        assert "Fabrics CONNECT timed out" in str(failed.value)

    run(body())


def test_c2h_term_req_fails_every_outstanding_command() -> None:
    """After three capsules the controller sends C2HTermReq: all three fail with its FES and FEI."""

    async def terminate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer_icreq(reader, writer)
        await reader.readexactly(3 * 72)
        writer.writelines(encode(TermReq(Fes.PDU_SEQUENCE_ERROR, 0, b"")))
        await writer.drain()

    async def body():
        async with fake_controller(terminate) as port:
            queue = await Queue.open("127.0.0.1", port, qid=0, depth=8, timeout=5)
            try:
                futures = [queue.submit(Sqe(AdminOpcode.KEEP_ALIVE)) for _ in range(3)]
                results = await asyncio.gather(*futures, return_exceptions=True)
            finally:
                await queue.close()
        assert all(isinstance(r, NvmeTransportError) for r in results), results
        assert {(r.fes, r.fei) for r in results} == {(Fes.PDU_SEQUENCE_ERROR, 0)}
        assert "C2HTermReq" in str(results[0]) and "PDU_SEQUENCE_ERROR" in str(results[0])

    run(body())
