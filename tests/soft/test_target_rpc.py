"""The soft target's SPDK-compatible JSON-RPC server: SPDK's own client, framing, errors, and a host
connecting to what RPC configured."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import run
from ports import free_port
from rpc_helpers import HOSTNQN, read_answer, request, soft_rpc_target, write_read_block
from spdk.rpc.client import JSONRPCClient, JSONRPCException

from appliance.nvmeof.spec import DISCOVERY_NQN
from appliance.nvmeof.target.model import ConfigError
from appliance.nvmeof.target.rpc import MAX_REQUEST, RpcServer

NQN = "nqn.2016-06.io.spdk:cnode1"
NSID_UUID = "2b1c9a0e-8f7d-4c3b-a1e2-d3c4b5a69788"


def error_of(client: JSONRPCClient, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The error object SPDK's client reports (it embeds the answer's JSON in its message)."""
    with pytest.raises(JSONRPCException) as info:
        client.call(method, params)
    return json.loads(info.value.message.split("response:\n", 1)[1])


def configure(path: str, image: Path, port: int) -> None:
    """Everything the Kahu reconciler does, through SPDK's client exactly as rpc.py would."""
    with JSONRPCClient(path, timeout=10) as c:
        version = c.spdk_get_version()
        assert version["version"].startswith("SPDK v26.05") and "kahu soft target" in version["version"]
        assert version["fields"] == {"major": 26, "minor": 5, "patch": 0, "suffix": ""}
        assert c.framework_wait_init() is True
        assert {"nvmf_create_transport", "bdev_aio_create", "spdk_kill_instance"} <= set(c.rpc_get_methods())

        assert c.nvmf_create_transport(trtype="TCP", max_queue_depth=64, c2h_success=False) is True
        [tcp] = c.nvmf_get_transports(trtype="tcp")
        assert (tcp["trtype"], tcp["max_queue_depth"], tcp["c2h_success"], tcp["in_capsule_data_size"]) == (
            "TCP", 64, False, 4096
        )
        assert error_of(c, "nvmf_create_transport", {"trtype": "TCP"})["code"] == -32602  # exists
        rdma = error_of(c, "nvmf_create_transport", {"trtype": "RDMA"})
        assert rdma["code"] == -32602 and "RDMA" in rdma["message"]
        bogus = error_of(c, "nvmf_create_transport", {"trtype": "TCP", "num_cqe": 4})
        assert bogus["code"] == -32602 and "num_cqe" in bogus["message"]

        assert c.bdev_malloc_create(num_blocks=2048, block_size=512) == "Malloc0"
        assert c.bdev_malloc_create(num_blocks=64, block_size=4096, uuid=NSID_UUID) == "Malloc1"
        assert c.bdev_aio_create(filename=str(image), name="aio0", block_size=4096) == "aio0"
        bdevs = {b["name"]: b for b in c.bdev_get_bdevs()}
        assert set(bdevs) == {"Malloc0", "Malloc1", "aio0"}
        aio = bdevs["aio0"]
        assert (aio["product_name"], aio["block_size"], aio["num_blocks"], aio["claimed"]) == (
            "AIO disk", 4096, image.stat().st_size // 4096, False
        )
        assert aio["driver_specific"]["aio"]["filename"] == str(image)
        assert aio["supported_io_types"]["read"] and aio["supported_io_types"]["write"]
        assert bdevs["Malloc1"]["uuid"] == NSID_UUID and bdevs["Malloc1"]["product_name"] == "Malloc disk"
        assert error_of(c, "bdev_get_bdevs", {"name": "nope"})["message"] == "No such device"

        assert c.nvmf_create_subsystem(nqn=NQN, serial_number="KAHU0001", model_number="Kahu test") is True
        assert error_of(c, "nvmf_create_subsystem", {"nqn": NQN})["code"] == -32602
        assert c.nvmf_subsystem_add_ns(nqn=NQN, namespace={"bdev_name": "aio0"}) == 1
        assert c.nvmf_subsystem_add_ns(nqn=NQN, namespace={"bdev_name": "Malloc1", "nsid": 5}) == 5
        assert error_of(c, "nvmf_subsystem_add_ns", {"nqn": NQN, "namespace": {"bdev_name": "aio0"}})[
            "code"
        ] == -32602  # already claimed
        assert c.nvmf_subsystem_add_host(nqn=NQN, host=HOSTNQN) is True
        address = {"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": str(port)}
        assert c.nvmf_subsystem_add_listener(nqn=NQN, listen_address=address) is True
        assert c.nvmf_subsystem_add_listener(nqn="discovery", listen_address=address) is True

        subsystems = {s["nqn"]: s for s in c.nvmf_get_subsystems()}
        listener = {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": str(port)}
        assert subsystems[DISCOVERY_NQN]["subtype"] == "Discovery"
        assert subsystems[DISCOVERY_NQN]["listen_addresses"] == [listener]
        sub = subsystems[NQN]
        identity = (sub["subtype"], sub["serial_number"], sub["model_number"])
        assert identity == ("NVMe", "KAHU0001", "Kahu test")
        assert sub["listen_addresses"] == [listener]
        assert sub["allow_any_host"] is False and sub["hosts"] == [{"nqn": HOSTNQN}]
        ns1, ns5 = sub["namespaces"]
        assert (ns5["nsid"], ns5["bdev_name"], ns5["name"]) == (5, "Malloc1", "Malloc1")
        assert ns5["uuid"] == NSID_UUID
        assert ns5["nguid"] == NSID_UUID.replace("-", "").upper() and len(ns1["nguid"]) == 32
        assert ns5["eui64"] == ns5["nguid"][:16]
        assert c.bdev_get_bdevs(name="aio0")[0]["claimed"] is True


def tear_down(path: str, port: int) -> None:
    """Undo ``configure`` in the safe order and check each removal is visible."""
    address = {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": str(port)}
    with JSONRPCClient(path, timeout=10) as c:
        iostat = {b["name"]: b for b in c.bdev_get_iostat()["bdevs"]}
        assert iostat["aio0"]["num_write_ops"] >= 1 and iostat["aio0"]["bytes_read"] >= 4096
        assert c.bdev_get_iostat()["tick_rate"] > 0
        assert c.nvmf_subsystem_remove_listener(nqn=NQN, listen_address=address) is True
        assert c.nvmf_subsystem_remove_listener(nqn="discovery", listen_address=address) is True
        assert error_of(c, "nvmf_subsystem_remove_listener", {"nqn": NQN, "listen_address": address})[
            "code"
        ] == -32602
        assert c.nvmf_subsystem_remove_host(nqn=NQN, host=HOSTNQN) is True
        assert c.nvmf_subsystem_allow_any_host(nqn=NQN, allow_any_host=True) is True
        assert c.nvmf_get_subsystems(nqn=NQN)[0]["allow_any_host"] is True
        claimed = error_of(c, "bdev_aio_delete", {"name": "aio0"})
        assert claimed["code"] == -32602  # still a namespace
        assert c.nvmf_subsystem_remove_ns(nqn=NQN, nsid=1) is True
        assert [n["nsid"] for n in c.nvmf_get_subsystems(nqn=NQN)[0]["namespaces"]] == [5]
        assert c.bdev_aio_delete(name="aio0") is True
        gone = error_of(c, "bdev_malloc_delete", {"name": "aio0"})
        assert gone == {"code": -32602, "message": "No such device"}
        assert c.nvmf_delete_subsystem(nqn=NQN) is True
        assert [s["nqn"] for s in c.nvmf_get_subsystems()] == [DISCOVERY_NQN]
        assert c.bdev_malloc_delete(name="Malloc1") is True  # released with its subsystem
        assert c.bdev_malloc_delete(name="Malloc0") is True
        assert c.bdev_get_bdevs() == []


def test_spdk_client_drives_full_scenario_and_host_connects(tmp_path: Path) -> None:
    path = str(tmp_path / "spdk.sock")
    image = tmp_path / "aio0.img"
    image.write_bytes(b"")
    os.truncate(image, 1 << 20)
    port = free_port()

    async def main() -> None:
        async with soft_rpc_target(path):
            await asyncio.to_thread(configure, path, image, port)
            sizes = await write_read_block("127.0.0.1", port, NQN)
            assert sizes == {1: 4096, 5: 4096}
            await asyncio.to_thread(tear_down, path, port)
            with pytest.raises(ConnectionRefusedError):  # the listener closed with its last subsystem
                socket.create_connection(("127.0.0.1", port), timeout=1).close()

    run(main())
    assert not os.path.exists(path), "stop() must remove the socket file"


async def open_rpc(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(path)


def run_raw(tmp_path: Path, body) -> None:
    """Run ``body(path)`` against a fresh in-process target's RPC socket."""
    path = str(tmp_path / "rpc.sock")

    async def main() -> None:
        async with soft_rpc_target(path):
            await body(path)

    run(main())


def test_two_requests_in_one_send_and_one_request_split_across_sends(tmp_path: Path) -> None:
    async def body(path: str) -> None:
        reader, writer = await open_rpc(path)
        both = json.dumps(request("spdk_get_version", 1)) + json.dumps(request("framework_wait_init", 2))
        writer.write(both.encode())
        assert (await read_answer(reader))["id"] == 1
        assert await read_answer(reader) == {"jsonrpc": "2.0", "id": 2, "result": True}
        split = json.dumps(request("bdev_malloc_create", "x", name="M\\\"{[", num_blocks=8, block_size=512))
        for i in range(0, len(split), 3):  # byte by byte-ish, braces inside strings included
            writer.write(split[i : i + 3].encode())
            await writer.drain()
        assert await read_answer(reader) == {"jsonrpc": "2.0", "id": "x", "result": 'M\\"{['}
        writer.close()

    run_raw(tmp_path, body)


def test_garbage_is_a_parse_error_that_closes_only_that_connection(tmp_path: Path) -> None:
    async def body(path: str) -> None:
        good_reader, good_writer = await open_rpc(path)
        bad_reader, bad_writer = await open_rpc(path)
        bad_writer.write(b"this is not json\n")
        answer = await read_answer(bad_reader)
        assert answer["id"] is None and answer["error"]["code"] == -32700
        assert await asyncio.wait_for(bad_reader.read(), 5) == b""  # closed
        broken_reader, broken_writer = await open_rpc(path)
        broken_writer.write(b'{"jsonrpc": "2.0", "id": 1, "method": }')
        assert (await read_answer(broken_reader))["error"]["code"] == -32700
        good_writer.write(json.dumps(request("framework_wait_init", 7)).encode())
        assert (await read_answer(good_reader))["result"] is True
        for w in (good_writer, bad_writer, broken_writer):
            w.close()

    run_raw(tmp_path, body)


def test_oversized_request_is_a_parse_error(tmp_path: Path) -> None:
    async def body(path: str) -> None:
        reader, writer = await open_rpc(path)
        huge = json.dumps(request("bdev_malloc_create", 1, name="x" * MAX_REQUEST, num_blocks=1,
                                  block_size=512))
        writer.write(huge.encode())
        answer = await read_answer(reader)
        assert answer["error"]["code"] == -32700 and "larger" in answer["error"]["message"]
        writer.close()

    run_raw(tmp_path, body)


@pytest.mark.parametrize(
    ("req", "code", "words"),
    [
        (request("no_such_method"), -32601, "no_such_method"),
        (request("bdev_malloc_create", num_blocks=8), -32602, "block_size"),
        (request("bdev_malloc_create", num_blocks="8", block_size=512), -32602, "num_blocks"),
        (request("bdev_malloc_create", num_blocks=8, block_size=512, colour="red"), -32602, "colour"),
        (request("bdev_malloc_create", num_blocks=8, block_size=500), -32602, "512"),
        (request("bdev_malloc_create", num_blocks=8, block_size=512, uuid="zz"), -32602, "not a UUID"),
        (request("nvmf_create_subsystem", nqn="not-an-nqn"), -32602, "nqn"),
        (request("nvmf_subsystem_add_listener", nqn=DISCOVERY_NQN,
                 listen_address={"trtype": "TCP", "traddr": "127.0.0.1", "trsvcid": 4420}),
         -32602, "trsvcid"),
        (request("nvmf_delete_subsystem", nqn="nqn.2016-06.io.spdk:none"), -32602, "does not exist"),
        (request("bdev_aio_delete", name="nope"), -32602, "No such device"),
        (request("framework_start_init"), -1, "initialization"),
        (request("nvmf_create_transport", trtype="TCP", max_io_size=1000), -32602, "max_io_size"),
        ({"jsonrpc": "1.0", "id": 3, "method": "spdk_get_version"}, -32600, "jsonrpc"),
        ({"jsonrpc": "2.0", "id": 3, "method": "spdk_get_version", "params": 5}, -32600, "params"),
        ({"jsonrpc": "2.0", "id": 3, "method": "spdk_get_version", "params": [1]}, -32602, "array"),
    ],
)
def test_error_codes(tmp_path: Path, req: dict[str, Any], code: int, words: str) -> None:
    async def body(path: str) -> None:
        reader, writer = await open_rpc(path)
        writer.write(json.dumps(req).encode())
        answer = await read_answer(reader)
        assert answer["error"]["code"] == code and words in answer["error"]["message"]
        assert answer["id"] == req.get("id")
        writer.write(json.dumps(request("framework_wait_init", 9)).encode())  # the connection survives
        assert (await read_answer(reader))["result"] is True
        writer.close()

    run_raw(tmp_path, body)


def test_batch_and_notifications(tmp_path: Path) -> None:
    async def body(path: str) -> None:
        reader, writer = await open_rpc(path)
        batch = [
            request("bdev_malloc_create", 1, num_blocks=8, block_size=512),
            request("no_such_method", 2),
            request("bdev_malloc_create", None, name="quiet", num_blocks=8, block_size=512),  # notification
            5,
        ]
        writer.write(json.dumps(batch).encode())
        answers = await read_answer(reader)
        assert [a["id"] for a in answers] == [1, 2, None]
        assert answers[0]["result"] == "Malloc0"
        assert answers[1]["error"]["code"] == -32601 and answers[2]["error"]["code"] == -32600
        writer.write(json.dumps(request("no_such_method", None)).encode())  # notification: no answer at all
        writer.write(json.dumps([request("spdk_get_version", None)]).encode())  # all-notification batch
        writer.write(json.dumps(request("bdev_get_bdevs", 3, name="quiet")).encode())
        answer = await read_answer(reader)
        assert answer["id"] == 3 and answer["result"][0]["name"] == "quiet"  # the notification did run
        writer.write(b"[]")
        assert (await read_answer(reader))["error"]["code"] == -32600
        writer.close()

    run_raw(tmp_path, body)


def test_many_concurrent_connections(tmp_path: Path) -> None:
    async def body(path: str) -> None:
        conns = [await open_rpc(path) for _ in range(16)]
        for i, (_, writer) in enumerate(conns):
            writer.write(json.dumps(request("bdev_malloc_create", i, name=f"m{i}", num_blocks=8,
                                            block_size=512)).encode())
        answers = [await read_answer(reader) for reader, _ in conns]
        assert [a["result"] for a in answers] == [f"m{i}" for i in range(16)]
        for _, writer in conns:
            writer.close()

    run_raw(tmp_path, body)


def test_socket_in_use_is_refused_and_stale_socket_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "rpc.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # bound, never listening: what a killed process leaves behind
    stale.close()

    async def main() -> None:
        async with soft_rpc_target(path) as server:
            with pytest.raises(ConfigError, match="in use"):
                await RpcServer(server, path).start()
            assert await asyncio.to_thread(lambda: JSONRPCClient(path, timeout=5).framework_wait_init())

    run(main())
    assert not os.path.exists(path)
