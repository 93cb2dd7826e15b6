"""Target lifecycle: the supervisor restarts a dead soft target and re-applies the node's state; a
target that cannot start fails fast with the reason; ``kahu node target`` runs until SIGINT and stops
cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import REPO, run
from ports import free_port
from rpc_helpers import write_read_block

from appliance.spdk_rpc.lifecycle import Backoff, NodeTarget, spdk_command
from appliance.spdk_rpc.nodeconfig import NodeConfig, parse_node_config
from appliance.spdk_rpc.rpc import RpcError

TIMEOUT = 60.0


def config(tmp_path: Path, port: int, **extra) -> NodeConfig:
    return parse_node_config({
        "name": "life",
        "data_addresses": [{"address": "127.0.0.1", "port": port}],
        "discovery_port": free_port(),
        "allow_any_host": True,
        "drives": [{"file": str(tmp_path / "d0.img"), "size": "1MiB"}, {"malloc": "1MiB", "name": "m0"}],
        "spdk": {"rpc_socket": str(tmp_path / "spdk.sock"), **extra},
        "transport": {"rdma": False},
    })


async def died(nt: NodeTarget) -> None:
    """Wait for the current target process to exit (it is ours: awaiting its exit is race-free)."""
    assert nt.process.proc is not None
    await asyncio.wait_for(nt.process.proc.wait(), TIMEOUT)


def test_killed_target_is_restarted_and_state_reapplied(tmp_path: Path) -> None:
    port = free_port()
    cfg = config(tmp_path, port)

    async def main() -> None:
        fast = Backoff(first=0.05, limit=0.2)
        async with NodeTarget(cfg, tmp_path / "state", backoff=fast, soft=True) as nt:
            first_pid = nt.process.pid
            blocks = await write_read_block("127.0.0.1", port, cfg.nqn)
            assert sorted(blocks) == [1, 2]

            os.kill(first_pid, signal.SIGKILL)
            await died(nt)
            await asyncio.wait_for(nt.wait_applied(2), TIMEOUT)
            assert nt.process.pid != first_pid
            assert [s.method for s in nt.last_plan.steps].count("nvmf_subsystem_add_ns") == 2
            bdevs = await asyncio.to_thread(nt.rpc.bdev_get_bdevs)
            assert {b["name"] for b in bdevs} == {"drive0", "m0"}
            assert sorted(await write_read_block("127.0.0.1", port, cfg.nqn)) == [1, 2]  # listener is back

            # spdk_kill_instance is SPDK's way to stop a target: the soft target obeys it too.
            await asyncio.to_thread(nt.rpc.call, "spdk_kill_instance", {"sig_name": "SIGTERM"})
            await died(nt)
            await asyncio.wait_for(nt.wait_applied(3), TIMEOUT)
            assert len(await asyncio.to_thread(nt.rpc.bdev_get_bdevs)) == 2
            last = nt.process.proc
        assert last is not None and last.returncode is not None, "leaving the context stops the target"

    run(main(), 2 * TIMEOUT)


def test_target_that_cannot_start_fails_with_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAHU_SPDK_BIN", "false")
    cfg = config(tmp_path, free_port())

    async def main() -> None:
        nt = NodeTarget(cfg, tmp_path / "state")
        assert nt.kind == "spdk" and nt.process.argv[0].endswith("false")
        with pytest.raises(RpcError, match="exited with status 1"):
            async with nt:
                pytest.fail("a target that exits at once cannot be running")

    run(main(), TIMEOUT)


def test_spdk_command_line(tmp_path: Path) -> None:
    no_huge = config(tmp_path, 4420, no_huge=True, cpumask="0x3", no_pci=True)
    assert spdk_command("/opt/nvmf_tgt", no_huge) == [
        "/opt/nvmf_tgt", "-m", "0x3", "-r", str(tmp_path / "spdk.sock"), "-s", "1024", "--no-huge", "-u",
    ]
    huge = config(tmp_path, 4420, no_huge=False, mem_size_mb=2048)
    assert spdk_command("nvmf_tgt", huge)[-2:] == ["2048", "-u"]  # no PCI drive: PCI untouched


def test_kahu_node_target_runs_until_sigint(tmp_path: Path) -> None:
    port = free_port()
    cfg_file = tmp_path / "node.yaml"
    cfg_file.write_text(
        f"name: up1\ndata_addresses: [{{address: 127.0.0.1, port: {port}}}]\ndiscovery_port: {free_port()}\n"
        f"allow_any_host: true\ndrives: [{{file: {tmp_path}/d.img, size: 1MiB}}]\n"
        f"spdk: {{rpc_socket: {tmp_path}/spdk.sock}}\ntransport: {{rdma: false}}\n"
    )

    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "appliance.cli.main", "node", "target", "--config", str(cfg_file),
            "--state-dir", str(tmp_path / "state"), cwd=REPO, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PATH": os.defpath},  # no SPDK: the soft target
        )
        try:
            assert proc.stdout is not None
            lines = []
            while not any(line.startswith("  allowed hosts") for line in lines):
                line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
                assert line, f"kahu node target exited early: {lines}"
                lines.append(line.decode().rstrip("\n"))
            text = "\n".join(lines)
            assert "nvme subsystem nqn.2026-11.io.kahu:up1" in text
            assert f"listening TCP 127.0.0.1:{port}" in text and "namespace 1: bdev drive0" in text
            assert sorted(await write_read_block("127.0.0.1", port, "nqn.2026-11.io.kahu:up1")) == [1]
            proc.send_signal(signal.SIGINT)
            rest = await asyncio.wait_for(proc.stdout.read(), TIMEOUT)
            assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
            assert rest.decode().strip().endswith("stopped")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    run(main(), 2 * TIMEOUT)
