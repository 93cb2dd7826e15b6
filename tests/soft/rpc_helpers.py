"""Shared pieces of the JSON-RPC, reconciler and lifecycle tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from appliance.nvmeof.host.controller import Controller
from appliance.nvmeof.target.rpc import RpcServer
from appliance.nvmeof.target.server import TargetServer
from appliance.spdk_rpc.rpc import SpdkRpc

IO_TIMEOUT = 10.0
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6f1f7a52-52a4-4cbe-9f8c-2b1e0a4d9c11"
READS = frozenset({"nvmf_get_transports", "bdev_get_bdevs", "nvmf_get_subsystems"})


@contextlib.asynccontextmanager
async def soft_rpc_target(path: str) -> AsyncIterator[TargetServer]:
    """An in-process soft target with its JSON-RPC server on ``path``."""
    async with TargetServer() as server:
        rpc = RpcServer(server, path)
        await rpc.start()
        try:
            yield server
        finally:
            await rpc.stop()


class CountingRpc(SpdkRpc):
    """An ``SpdkRpc`` that records every method it calls, to prove what a reconcile issued."""

    def __init__(self, client: Any, path: str):
        super().__init__(client, path)
        self.methods: list[str] = []

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self.methods.append(method)
        return super().call(method, params)

    def mutations(self) -> list[str]:
        return [m for m in self.methods if m not in READS]


async def read_answer(reader: asyncio.StreamReader) -> Any:
    """One answer: SPDK ends each with a newline and JSON text never contains a raw one."""
    line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT)
    assert line.endswith(b"\n"), f"connection closed mid-answer: {line!r}"
    return json.loads(line)


def request(method: str, rid: int | None = 1, **params: Any) -> dict[str, Any]:
    req: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if rid is not None:
        req["id"] = rid
    if params:
        req["params"] = params
    return req


async def write_read_block(traddr: str, port: int | str, nqn: str, hostnqn: str = HOSTNQN) -> dict[int, int]:
    """Connect as an NVMe/TCP host, write and read back block 0 of every namespace; nsid -> block size."""
    ctrl = await asyncio.wait_for(Controller.connect(traddr, port, nqn, hostnqn=hostnqn), IO_TIMEOUT)
    try:
        for nsid, info in ctrl.namespaces.items():
            pattern = os.urandom(info.block_size)
            await asyncio.wait_for(ctrl.write(nsid, 0, pattern), IO_TIMEOUT)
            back = bytearray(info.block_size)
            await asyncio.wait_for(ctrl.read(nsid, 0, back), IO_TIMEOUT)
            assert back == pattern, f"namespace {nsid} read back other data"
        return {nsid: info.block_size for nsid, info in ctrl.namespaces.items()}
    finally:
        await ctrl.close()
