"""The soft target's admin queue over real loopback sockets: ICReq, Connect, properties, Identify,
features, log pages, asynchronous events and keep-alive."""

from __future__ import annotations

import asyncio

from conftest import TEST_NQN, run
from nvme_wire import OTHER_HOSTNQN, WireQueue, open_controller, open_io_queue, open_queues

from appliance.nvmeof.identify import IdentifyController, IdentifyNamespace, NamespaceIds, unpack_nsid_list
from appliance.nvmeof.pdu import ICReq, TermReq
from appliance.nvmeof.spec import AdminOpcode, Cns, Feature, LogPage, Property, Status
from appliance.nvmeof.target.model import MallocBdev

AEN_NS_CHANGED = 0x00040002


def test_icresp_echoes_digests_and_limits(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            for hd, dd in ((False, False), (True, False), (False, True), (True, True)):
                q = await WireQueue.open(t.io_port, hdgst=hd, ddgst=dd)
                resp = q.icresp
                assert (resp.pfv, resp.cpda, resp.hdgst, resp.ddgst) == (0, 0, hd, dd)
                assert resp.maxh2cdata == 131072
                await q.close()

    run(scenario())


def test_connect_enable_and_properties(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            q = await WireQueue.open(t.io_port)
            before = await q.prop_get(Property.CAP, size8=True)
            assert before.status == Status.COMMAND_SEQUENCE_ERROR  # nothing before Connect
            done = await q.connect(TEST_NQN, kato=0)
            assert done.status == 0 and 1 <= done.cqe.dw0 <= 0xFFEF and done.cqe.sqhd == 1
            cap = await q.prop_get(Property.CAP, size8=True)
            value = cap.cqe.dw0 | cap.cqe.dw1 << 32
            assert value & 0xFFFF == 127 and value >> 16 & 1 and (value >> 24) & 0xFF == 30
            assert (value >> 37) & 0xFF == 1 and not value >> 59 & 1  # CSS NVM only, no CRWMS
            assert (await q.prop_get(Property.CAP + 4)).cqe.dw0 == value >> 32
            assert (await q.prop_get(Property.VS)).cqe.dw0 == 0x00010300
            assert (await q.prop_get(0x68)).status == Status.CONNECT_INVALID_PARAMETERS
            assert (await q.prop_get(Property.CSTS)).cqe.dw0 == 0
            ident = await q.identify(Cns.CONTROLLER)
            assert ident.status == Status.COMMAND_SEQUENCE_ERROR  # admin commands need CC.EN
            await q.enable()
            assert (await q.prop_get(Property.CC)).cqe.dw0 == 0x460001
            shutdown = await q.prop_set(Property.CC, 0x464001)
            assert shutdown.status == 0
            assert (await q.prop_get(Property.CSTS)).cqe.dw0 == 0x9  # RDY, SHST complete
            await q.close()

    run(scenario())


def test_identify_controller_and_namespaces(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            q = await open_controller(t.io_port, TEST_NQN)
            done = await q.identify(Cns.CONTROLLER)
            assert done.c2h_success and len(done.data) == 4096
            ctrl = IdentifyController.unpack(done.data)
            assert ctrl.cntlid == q.cntlid and ctrl.subnqn == TEST_NQN and ctrl.sn == "KAHUTEST0001"
            assert (ctrl.kas, ctrl.ioccsz, ctrl.iorcsz, ctrl.icdoff) == (1, 260, 1, 0)
            assert (ctrl.sgls, ctrl.maxcmd, ctrl.nn, ctrl.mdts) == (0x00100001, 128, 32, 5)
            assert (ctrl.oaes, ctrl.cntrltype, ctrl.oncs, ctrl.vwc, ctrl.lpa) == (1 << 8, 1, 0x0D, 1, 0x04)
            assert unpack_nsid_list((await q.identify(Cns.ACTIVE_NS_LIST)).data) == [1, 2]
            assert unpack_nsid_list((await q.identify(Cns.ACTIVE_NS_LIST, nsid=1)).data) == [2]
            ns1 = IdentifyNamespace.unpack((await q.identify(Cns.NAMESPACE, 1)).data)
            ns2 = IdentifyNamespace.unpack((await q.identify(Cns.NAMESPACE, 2)).data)
            assert (ns1.nsze, ns1.block_size, ns2.nsze, ns2.block_size) == (32768, 512, 2048, 4096)
            ids1 = NamespaceIds.unpack((await q.identify(Cns.NS_DESC_LIST, 1)).data)
            ids2 = NamespaceIds.unpack((await q.identify(Cns.NS_DESC_LIST, 2)).data)
            assert ids1.csi == 0 and ids1.nguid == ns1.nguid and ids1.eui64 == ns1.eui64 and ids1.uuid
            assert len({ids1.nguid, ids2.nguid}) == 2 and ids1.uuid != ids2.uuid
            inactive = await q.identify(Cns.NAMESPACE, 5)
            assert inactive.status == 0 and inactive.data == bytes(4096)
            assert (await q.identify(Cns.NAMESPACE, 33)).status == Status.INVALID_NAMESPACE
            assert (await q.identify(Cns.NS_DESC_LIST, 5)).status == Status.INVALID_NAMESPACE
            indep = await q.identify(Cns.INDEPENDENT_NAMESPACE, 1)
            assert indep.data[14] == 1 and indep.data[1] == 1
            assert (await q.identify(Cns.CSI_CONTROLLER, csi=0)).data == bytes(4096)
            assert (await q.identify(Cns.CSI_CONTROLLER, csi=2)).status == Status.INVALID_FIELD
            assert unpack_nsid_list((await q.identify(Cns.CSI_ACTIVE_NS_LIST, csi=0)).data) == [1, 2]
            assert (await q.identify(Cns.IO_COMMAND_SET)).data[0] == 1
            assert (await q.identify(0x10)).status == Status.INVALID_FIELD
            await q.close()

    run(scenario())


def test_features(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            q = await open_controller(t.io_port, TEST_NQN, kato=5000)
            assert (await q.get_features(Feature.KEEP_ALIVE_TIMER)).cqe.dw0 == 5000
            nq = await q.set_features(Feature.NUMBER_OF_QUEUES, 0x03FF03FF)
            assert nq.status == 0 and nq.cqe.dw0 == 0x007E007E
            small = await q.set_features(Feature.NUMBER_OF_QUEUES, 0x00010003)
            assert small.cqe.dw0 == 0x00010001  # min of both halves, granted in both
            assert (await q.get_features(Feature.NUMBER_OF_QUEUES)).cqe.dw0 == 0x00010001
            assert (await q.set_features(Feature.ASYNC_EVENT_CONFIG, 0x11F)).status == 0
            assert (await q.get_features(Feature.ASYNC_EVENT_CONFIG)).cqe.dw0 == 0x11F
            assert (await q.get_features(Feature.TEMPERATURE_THRESHOLD)).cqe.dw0 == 0x157
            assert (await q.get_features(Feature.VOLATILE_WRITE_CACHE)).cqe.dw0 == 1
            assert (await q.set_features(Feature.VOLATILE_WRITE_CACHE, 0)).status == 0
            assert (await q.get_features(Feature.VOLATILE_WRITE_CACHE)).cqe.dw0 == 0
            for fid in (Feature.ARBITRATION, Feature.POWER_MANAGEMENT, Feature.ERROR_RECOVERY,
                        Feature.WRITE_ATOMICITY, Feature.INTERRUPT_COALESCING):  # fmt: skip
                assert (await q.get_features(fid)).status == 0
            saved = await q.set_features(Feature.ARBITRATION, 1, save=True)
            assert saved.status == Status.FEATURE_NOT_SAVEABLE
            assert (await q.get_features(0x7E)).status == Status.INVALID_FIELD
            assert (await q.set_features(Feature.KEEP_ALIVE_TIMER, 0)).status == Status.KEEP_ALIVE_INVALID
            assert (await q.set_features(Feature.KEEP_ALIVE_TIMER, 12345)).status == 0
            assert (await q.get_features(Feature.KEEP_ALIVE_TIMER)).cqe.dw0 == 12400  # KAS 1: 100 ms units
            io = await open_io_queue(t.io_port, TEST_NQN, q.cntlid, qid=1)
            late = await q.set_features(Feature.NUMBER_OF_QUEUES, 0)
            assert late.status == Status.COMMAND_SEQUENCE_ERROR
            await io.close()
            await q.close()

    run(scenario())


def test_log_pages(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            q, io = await open_queues(t.io_port, TEST_NQN)
            assert (await io.write(1, 0, b"\x5a" * 4096, 512)).status == 0
            assert (await io.read(1, 0, 8, 512)).status == 0
            smart = await q.get_log(LogPage.SMART, 512, nsid=0xFFFFFFFF)
            assert len(smart.data) == 512 and smart.data[1:3] == b"\x41\x01" and smart.data[3] == 100
            assert int.from_bytes(smart.data[64:80], "little") == 1  # host read commands
            assert int.from_bytes(smart.data[80:96], "little") == 1  # host write commands
            assert int.from_bytes(smart.data[48:64], "little") == 1  # data units written, rounded up
            error = await q.get_log(LogPage.ERROR, 8192)
            assert error.status == 0 and error.data == bytes(8192)
            fw = await q.get_log(LogPage.FIRMWARE_SLOT, 512)
            assert fw.data[0] == 1 and fw.data[8:16].strip() != b""
            assert (await q.get_log(LogPage.COMMANDS_SUPPORTED, 4096)).status == Status.INVALID_LOG_PAGE
            assert (await q.get_log(LogPage.DISCOVERY, 1024)).status == Status.INVALID_LOG_PAGE
            assert (await q.get_log(0xC0, 512)).status == Status.INVALID_LOG_PAGE
            assert (await q.get_log(LogPage.SMART, 512, offset=2)).status == Status.INVALID_FIELD
            await io.close()
            await q.close()

    run(scenario())


def test_async_events_for_namespace_changes(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            q = await open_controller(t.io_port, TEST_NQN)
            assert (await q.set_features(Feature.ASYNC_EVENT_CONFIG, 0x100)).status == 0
            cids = [await q.submit_aer() for _ in range(4)]
            fifth = await q.admin(AdminOpcode.ASYNC_EVENT_REQUEST)
            assert fifth.status == Status.AER_LIMIT_EXCEEDED
            target = t.server.target
            target.add_bdev(MallocBdev("extra", 512, 2048))
            nsid = target.add_namespace(TEST_NQN, "extra")
            event = await q.wait(cids[0])
            assert event.status == 0 and event.cqe.dw0 == AEN_NS_CHANGED
            changed = await q.get_log(LogPage.CHANGED_NS_LIST, 4096, rae=True)
            assert unpack_nsid_list(changed.data) == [nsid]
            cleared = await q.get_log(LogPage.CHANGED_NS_LIST, 4096)
            assert unpack_nsid_list(cleared.data) == [nsid]
            assert unpack_nsid_list((await q.get_log(LogPage.CHANGED_NS_LIST, 4096)).data) == []
            target.remove_namespace(TEST_NQN, nsid)
            assert (await q.wait(cids[1])).cqe.dw0 == AEN_NS_CHANGED
            await q.close()

    run(scenario())


def test_keep_alive_expiry_closes_every_queue(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            q = await open_controller(t.io_port, TEST_NQN, kato=300)
            io = await open_io_queue(t.io_port, TEST_NQN, q.cntlid)
            for _ in range(3):  # keep-alives keep it alive past one KATO
                assert (await q.admin(AdminOpcode.KEEP_ALIVE)).status == 0
                await asyncio.sleep(0.15)  # pacing the host's keep-alives, as a real host does
            assert t.server.find_controller(t.server.target.subsystem(TEST_NQN), q.cntlid) is not None
            assert await q.closed_by_peer() and await io.closed_by_peer()
            assert t.server.controllers(t.server.target.subsystem(TEST_NQN)) == []

    run(scenario())


def test_abort_and_pcie_opcodes(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            q = await open_controller(t.io_port, TEST_NQN)
            abort = await q.admin(AdminOpcode.ABORT, cdw10=5 << 16)
            assert abort.status == 0 and abort.cqe.dw0 & 1
            for opc in (AdminOpcode.CREATE_IO_SQ, AdminOpcode.DELETE_IO_CQ, 0xC1):
                assert (await q.admin(opc)).status == Status.INVALID_OPCODE
            await q.close()

    run(scenario())


def test_connect_errors(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            q = await WireQueue.open(t.io_port)
            unknown = await q.connect("nqn.2026-11.io.kahu:nope")
            assert unknown.status == Status.CONNECT_INVALID_PARAMETERS and unknown.cqe.dw0 == (1 << 16) | 256
            denied = await q.connect(TEST_NQN, OTHER_HOSTNQN)
            assert denied.status == Status.CONNECT_INVALID_HOST
            zero = await q.connect(TEST_NQN, sqsize=0)
            assert zero.status == Status.CONNECT_INVALID_PARAMETERS and zero.cqe.dw0 == 44
            admin = await open_controller(t.io_port, TEST_NQN)
            assert (await admin.set_features(Feature.NUMBER_OF_QUEUES, 0x00010001)).status == 0
            io = await WireQueue.open(t.io_port)
            bad_cntlid = await io.connect(TEST_NQN, qid=1, cntlid=admin.cntlid + 100, sqsize=31)
            assert bad_cntlid.cqe.dw0 == (1 << 16) | 16
            wrong_host = await io.connect(TEST_NQN, OTHER_HOSTNQN, qid=1, cntlid=admin.cntlid, sqsize=31)
            assert wrong_host.status == Status.CONNECT_INVALID_HOST
            too_high = await io.connect(TEST_NQN, qid=3, cntlid=admin.cntlid, sqsize=31)
            assert too_high.status == Status.CONNECT_INVALID_PARAMETERS and too_high.cqe.dw0 == 42
            assert (await io.connect(TEST_NQN, qid=2, cntlid=admin.cntlid, sqsize=31)).status == 0
            dup = await WireQueue.open(t.io_port)
            again = await dup.connect(TEST_NQN, qid=2, cntlid=admin.cntlid, sqsize=31)
            assert again.status == Status.COMMAND_SEQUENCE_ERROR
            for queue in (q, admin, io, dup):
                await queue.close()

    run(scenario())


def test_bad_first_pdu_gets_termreq(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            q = await WireQueue.open(t.io_port)
            await q.send(ICReq())
            term = await q.recv()
            assert isinstance(term, TermReq) and term.fes == 0x02 and len(term.header) == 128
            assert await q.closed_by_peer()
            healthy = await open_controller(t.io_port, TEST_NQN)  # others are still served
            assert (await healthy.identify(Cns.CONTROLLER)).status == 0
            await healthy.close()

    run(scenario())
