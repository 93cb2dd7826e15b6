"""Access control and lifecycle: allow-lists, two hosts, revoking access, deleting subsystems."""

from __future__ import annotations

from conftest import TEST_NQN, WIRE_HOSTNQN, default_target_config, run
from nvme_wire import OTHER_HOSTNQN, WireQueue, open_controller, open_io_queue, open_queues

from appliance.nvmeof.identify import IdentifyController
from appliance.nvmeof.spec import Cns, Status


def test_two_hosts_get_distinct_controllers(soft_target, tmp_path) -> None:
    config = default_target_config(tmp_path)
    config["subsystems"][0]["hosts"].append(OTHER_HOSTNQN)

    async def scenario() -> None:
        async with soft_target(config) as t:
            a = await open_controller(t.io_port, TEST_NQN, WIRE_HOSTNQN)
            b = await open_controller(t.io_port, TEST_NQN, OTHER_HOSTNQN)
            assert a.cntlid != b.cntlid
            ids = [IdentifyController.unpack((await q.identify(Cns.CONTROLLER)).data).cntlid for q in (a, b)]
            assert ids == [a.cntlid, b.cntlid]
            # B cannot attach an I/O queue to A's controller.
            stolen = await WireQueue.open(t.io_port)
            done = await stolen.connect(TEST_NQN, OTHER_HOSTNQN, qid=1, cntlid=a.cntlid, sqsize=31)
            assert done.status == Status.CONNECT_INVALID_PARAMETERS and done.cqe.dw0 == (1 << 16) | 512
            io_b = await open_io_queue(t.io_port, TEST_NQN, b.cntlid, hostnqn=OTHER_HOSTNQN)
            # Revoking B's access drops B's controller and queues, A keeps working.
            t.server.target.remove_host(TEST_NQN, OTHER_HOSTNQN)
            assert await b.closed_by_peer() and await io_b.closed_by_peer()
            assert (await a.identify(Cns.CONTROLLER)).status == 0
            again = await WireQueue.open(t.io_port)
            assert (await again.connect(TEST_NQN, OTHER_HOSTNQN)).status == Status.CONNECT_INVALID_HOST
            for q in (a, stolen, again):
                await q.close()

    run(scenario())


def test_allow_any_host_and_its_removal(soft_target, tmp_path) -> None:
    config = default_target_config(tmp_path)
    config["subsystems"][0]["allow_any_host"] = True
    config["subsystems"][0]["hosts"] = []

    async def scenario() -> None:
        async with soft_target(config) as t:
            anyone = await open_controller(t.io_port, TEST_NQN, OTHER_HOSTNQN)
            t.server.target.allow_any_host(TEST_NQN, False)
            assert await anyone.closed_by_peer()
            q = await WireQueue.open(t.io_port)
            assert (await q.connect(TEST_NQN, OTHER_HOSTNQN)).status == Status.CONNECT_INVALID_HOST
            await q.close()

    run(scenario())


def test_deleting_a_subsystem_drops_its_controllers(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            admin, io = await open_queues(t.io_port, TEST_NQN)
            await t.server.target.delete_subsystem(TEST_NQN)
            assert await admin.closed_by_peer() and await io.closed_by_peer()

    run(scenario())


def test_closing_the_admin_queue_ends_the_controller(soft_target) -> None:
    async def scenario() -> None:
        async with soft_target() as t:
            admin, io = await open_queues(t.io_port, TEST_NQN)
            await admin.close()
            assert await io.closed_by_peer()
            assert t.server.controllers(t.server.target.subsystem(TEST_NQN)) == []

    run(scenario())
