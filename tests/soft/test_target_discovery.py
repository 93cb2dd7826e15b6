"""The discovery controller: per-host log pages, GENCTR, offsets, its own listener and change events."""

from __future__ import annotations

from conftest import TEST_NQN, WIRE_HOSTNQN, run
from nvme_wire import OTHER_HOSTNQN, open_controller
from ports import free_port

from appliance.nvmeof.identify import DiscoveryEntry, IdentifyController, unpack_discovery_header
from appliance.nvmeof.spec import DISCOVERY_NQN, Cns, Feature, LogPage, Status

AEN_DISCOVERY = 0x0070F002
OPEN_NQN = "nqn.2026-11.io.kahu:open"


def config(io_port: int, disc_port: int) -> dict:
    return {
        "discovery": {"listeners": [{"traddr": "127.0.0.1", "trsvcid": str(disc_port)}]},
        "subsystems": [
            {"nqn": TEST_NQN, "hosts": [WIRE_HOSTNQN], "namespaces": [{"malloc": "1MiB"}],
             "listeners": [{"traddr": "127.0.0.1", "trsvcid": str(io_port)}]},
            {"nqn": OPEN_NQN, "allow_any_host": True, "namespaces": [{"malloc": "1MiB"}],
             "listeners": [{"traddr": "127.0.0.1", "trsvcid": str(io_port)}]},
        ],
    }  # fmt: skip


def entries(log: bytes) -> list[DiscoveryEntry]:
    _genctr, numrec = unpack_discovery_header(log)
    return [DiscoveryEntry.unpack(log[1024 * (i + 1) : 1024 * (i + 2)]) for i in range(numrec)]


def test_discovery_log_per_host(soft_target) -> None:
    io_port, disc_port = free_port(), free_port()

    async def scenario() -> None:
        async with soft_target(config(io_port, disc_port)) as t:
            d = await open_controller(disc_port, DISCOVERY_NQN)
            ident = IdentifyController.unpack((await d.identify(Cns.CONTROLLER)).data)
            assert (ident.cntrltype, ident.subnqn, ident.oaes) == (2, DISCOVERY_NQN, 1 << 31)
            assert (await d.identify(Cns.NAMESPACE, 1)).status == Status.INVALID_FIELD
            head = await d.get_log(LogPage.DISCOVERY, 1024)
            genctr, numrec = unpack_discovery_header(head.data)
            assert numrec == 3
            full = (await d.get_log(LogPage.DISCOVERY, 4096)).data
            got = {(e.subnqn, e.subtype, e.trsvcid, e.traddr) for e in entries(full)}
            assert got == {(TEST_NQN, 2, str(io_port), "127.0.0.1"), (OPEN_NQN, 2, str(io_port), "127.0.0.1"),
                           (DISCOVERY_NQN, 3, str(disc_port), "127.0.0.1")}  # fmt: skip
            first = entries(full)[0]
            assert (first.trtype, first.adrfam, first.treq, first.cntlid, first.asqsz) == (
                3,
                1,
                2,
                0xFFFF,
                128,
            )
            tail = await d.get_log(LogPage.DISCOVERY, 1024, offset=2048)
            assert tail.data == full[2048:3072]
            past = await d.get_log(LogPage.DISCOVERY, 1024, offset=8192)
            assert past.status == 0 and past.data == bytes(1024)  # zero fill past the end
            assert (await d.get_log(LogPage.SMART, 512)).status == Status.INVALID_LOG_PAGE

            other = await open_controller(disc_port, DISCOVERY_NQN, OTHER_HOSTNQN)
            theirs = {e.subnqn for e in entries((await other.get_log(LogPage.DISCOVERY, 4096)).data)}
            assert theirs == {OPEN_NQN, DISCOVERY_NQN}  # the allow-list hides TEST_NQN

            assert (await d.set_features(Feature.ASYNC_EVENT_CONFIG, 1 << 31)).status == 0
            aer = await d.submit_aer()
            t.server.target.add_host(TEST_NQN, OTHER_HOSTNQN)
            assert (await d.wait(aer)).cqe.dw0 == AEN_DISCOVERY
            assert unpack_discovery_header((await d.get_log(LogPage.DISCOVERY, 1024)).data)[0] > genctr
            theirs = {e.subnqn for e in entries((await other.get_log(LogPage.DISCOVERY, 4096)).data)}
            assert TEST_NQN in theirs
            # The discovery subsystem is also reachable on an I/O listener, as with SPDK.
            via_io = await open_controller(io_port, DISCOVERY_NQN)
            assert (await via_io.get_log(LogPage.DISCOVERY, 1024)).status == 0
            for q in (d, other, via_io):
                await q.close()

    run(scenario())
