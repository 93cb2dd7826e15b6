"""``kahu up`` / ``kahu down`` as a user runs them: six healthy nodes from nothing in under 20 s, a fast
``kahu status``, a second ``up`` that says it runs already, crashed backends restarted by the
supervisor, a ``down`` that leaves no process or namespace behind, and state that survives the cycle."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusters import until
from conftest import run, run_kahu
from pyroute2 import netns

from appliance.cluster.etcd import Etcd
from appliance.cluster.store import ClusterStore
from appliance.home import running_record
from appliance.procs import process_alive

SUBNET = "10.76.0.0/24"  # not kahu up's default, so a user's own cluster on this machine is left alone
UP_LIMIT = 20.0
STATUS_LIMIT = 1.0


def kahu(home: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return run_kahu(*args, home=home, timeout=timeout)


def timed(home: Path, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    began = time.monotonic()
    result = kahu(home, *args)
    return time.monotonic() - began, result


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A Kahu home whose cluster is brought down after the test, even when it failed."""
    path = tmp_path / "kahu"
    try:
        yield path
    finally:
        record = running_record(path)
        kahu(path, "down", timeout=90)
        if record and process_alive(int(record["supervisor_pid"])):
            os.kill(int(record["supervisor_pid"]), signal.SIGKILL)


def up_args() -> list[str]:
    return ["up", "--subnet", SUBNET] if os.geteuid() == 0 else ["up", "--loopback", "--base-port", "25000"]


def status(home: Path) -> dict:
    result = kahu(home, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_up_status_restart_down_and_up_again(home: Path) -> None:
    elapsed, result = timed(home, *up_args())
    assert result.returncode == 0, result.stderr + result.stdout
    assert elapsed < UP_LIMIT, f"kahu up took {elapsed:.1f}s"
    assert "nodes 6/6 up" in result.stdout

    doc = status(home)
    assert [n["health"] for n in doc["nodes"]] == ["up"] * 6
    assert len(doc["etcd"]) == 3 and all(m["healthy"] for m in doc["etcd"])
    assert all(d["exported"] for d in doc["drives"]) and len(doc["drives"]) == 6
    best = min(timed(home, "status")[0] for _ in range(3))
    assert best < STATUS_LIMIT, f"kahu status took {best:.2f}s"

    again = kahu(home, *up_args())
    assert again.returncode == 0 and "already running" in again.stdout

    # The supervisor restarts a crashed backend; the node comes back with a new process.
    record = running_record(home)
    assert record is not None
    victim_pid = record["nodes"]["node2"]
    os.kill(victim_pid, signal.SIGKILL)

    async def node2_back(store: ClusterStore) -> bool:
        heartbeat = (await store.observed()).heartbeats.get("node2")
        return heartbeat is not None and heartbeat.pid != victim_pid

    async def wait_back() -> None:
        async with Etcd(record["etcd"]) as etcd:
            await until(etcd, node2_back, 30, "node2 restarted by the supervisor")

    run(wait_back(), 40)

    created = kahu(home, "fs", "create", "keep", "--capacity", "1GiB")
    assert created.returncode == 0, created.stderr
    uuid = doc["cluster"]["uuid"]
    namespaces = set(record["namespaces"])

    down = kahu(home, "down")
    assert down.returncode == 0 and "stopped" in down.stdout, down.stderr
    assert not process_alive(record["supervisor_pid"])
    assert not any(process_alive(pid) for pid in record["nodes"].values())
    assert not namespaces & set(netns.listnetns())
    assert running_record(home) is None
    gone = kahu(home, "status", timeout=20)
    assert gone.returncode == 1 and "kahu: error:" in gone.stderr
    assert "not running" in kahu(home, "down").stdout

    elapsed, result = timed(home, *up_args())
    assert result.returncode == 0, result.stderr + result.stdout
    doc = status(home)
    assert doc["cluster"]["uuid"] == uuid  # the same cluster, from etcd's data on disk
    assert [f["name"] for f in doc["filesystems"]] == ["keep"]
    assert [n["health"] for n in doc["nodes"]] == ["up"] * 6


def test_up_refuses_bad_or_contradicting_options(home: Path) -> None:
    bad = kahu(home, "up", "--nodes", "2", "--loopback")
    assert bad.returncode == 1 and "--nodes" in bad.stderr and "Traceback" not in bad.stderr
    assert running_record(home) is None

    made = kahu(home, "up", "--nodes", "3", "--etcd-members", "1", "--loopback", "--base-port", "25400",
                "--drive-size", "64MiB")
    assert made.returncode == 0, made.stderr + made.stdout
    assert "nodes 3/3 up" in made.stdout
    assert kahu(home, "down").returncode == 0

    clash = kahu(home, "up", "--nodes", "5", "--loopback")
    assert clash.returncode == 1 and "already holds a cluster made with nodes=3" in clash.stderr
    assert running_record(home) is None


def test_supervisor_killed_takes_its_cluster_with_it(home: Path) -> None:
    made = kahu(home, "up", "--nodes", "3", "--etcd-members", "1", "--loopback", "--base-port", "25600",
                "--drive-size", "64MiB")
    assert made.returncode == 0, made.stderr + made.stdout
    record = running_record(home)
    assert record is not None
    supervisor = record["supervisor_pid"]
    os.kill(supervisor, signal.SIGKILL)
    # Its children were started with PR_SET_PDEATHSIG: they get SIGTERM and stop on their own.
    for pid in [*record["nodes"].values(), *record["etcd_pids"].values()]:
        wait_exit(pid)
    assert "not running" in kahu(home, "down").stdout  # the lock died with the supervisor


def wait_exit(pid: int, timeout: float = 20.0) -> None:
    """Wait (bounded) for a process that is not our child to exit, via a pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([fd], [], [], timeout)[0], f"pid {pid} still runs {timeout}s later"
    finally:
        os.close(fd)
