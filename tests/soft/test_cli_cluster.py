"""The cluster commands of ``kahu`` (cluster, node, drive, fs, status) as subprocesses against a real
one-member etcd: what they print and store when they succeed, and, when they refuse, a one-line
``kahu: error: ...`` on stderr, exit status 1 (2 for argparse misuse) and etcd left exactly as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusters import make_etcd
from conftest import REPO, run, run_kahu
from ports import free_port

from appliance.cluster.etcd import Etcd
from appliance.cluster.etcd_server import EtcdCluster
from appliance.cluster.schema import HEARTBEATS, Heartbeat, Node, ProtectionPolicy, dumps
from appliance.cluster.store import ClusterStore

MiB = 1 << 20
GiB = 1 << 30
PREPARED_USABLE = 2 * GiB * 2 * 4 // (4 * 5)
CLI_TIMEOUT = 30.0  # a hung command fails the test instead of hanging it
NO_CLUSTER = "no cluster here yet: create one with `kahu cluster create`"

Snapshot = tuple[dict[str, bytes], int]


# --- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with make_etcd(tmp_path_factory.mktemp("etcd"), 1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty KAHU_HOME, so no `kahu up` record on this machine decides which etcd is used."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture
def url(etcd_server: EtcdCluster) -> str:
    """The shared member's client URL, with ``/kahu/`` wiped: no cluster yet."""

    async def wipe() -> None:
        async with Etcd(etcd_server.endpoints) as etcd:
            await etcd.delete("/kahu/", prefix=True)

    run(wipe(), 10.0)
    return etcd_server.endpoints[0]


@pytest.fixture
def cluster(url: str) -> Iterator[str]:
    """A cluster made through the store: 2+2 with a hot spare on node1..node5 (own failure domains), file
    drives of 1 GiB on node1 and node2 (/srv/d1.img), file system ``data`` of 256 MiB, node5 up (it has
    a heartbeat). Usable: 2 GiB x 2/4 x 4/5 = 819.2 MiB."""

    async def prepare() -> int:
        async with Etcd([url]) as etcd:
            store = ClusterStore(etcd)
            await store.create_cluster("prepared", ProtectionPolicy(2, 2, 1),
                                       [Node(f"node{i}", f"10.0.0.{i}") for i in range(1, 6)])
            for node in ("node1", "node2"):
                await store.add_drive(node, {"file": "/srv/d1.img", "size": "1GiB"})
            await store.create_fs("data", 256 * MiB)
            lease, _ = await etcd.lease_grant(60)
            await etcd.put(HEARTBEATS + "node5", dumps(Heartbeat("node5", 1, time.time(), lease)), lease)
            return lease

    async def revoke(lease: int) -> None:
        async with Etcd([url]) as etcd:
            await etcd.lease_revoke(lease)

    lease = run(prepare(), 10.0)
    try:
        yield url
    finally:
        run(revoke(lease), 10.0)


def kahu(home: Path, *args: str, etcd: str | None = None, timeout: float = CLI_TIMEOUT
         ) -> subprocess.CompletedProcess[str]:
    """``kahu ARGS [--etcd URL]`` as a subprocess; $KAHU_ETCD unset, $KAHU_HOME an empty directory."""
    return run_kahu(*args, *(["--etcd", etcd] if etcd else []), home=home, timeout=timeout)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must have succeeded quietly."""
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    assert result.stderr == ""
    return result.stdout


def failed(result: subprocess.CompletedProcess[str], expected: str) -> str:
    """A command that failed cleanly: exit 1, nothing on stdout, one ``kahu: error:`` line saying why."""
    assert result.returncode == 1, f"exit {result.returncode}: {result.stdout} {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kahu: error: "), result.stderr
    assert expected in lines[0], f"{expected!r} not in {lines[0]!r}"
    assert result.stdout == ""
    return lines[0]


def snapshot(url: str) -> Snapshot:
    """Every key and value under /kahu/, and the store revision (which any write would move)."""

    async def read() -> Snapshot:
        async with Etcd([url]) as etcd:
            kvs, revision = await etcd.get_prefix_at("/kahu/")
            return {kv.key: kv.value for kv in kvs}, revision

    return run(read(), 10.0)


def nodes_args(count: int, racks: int = 0) -> list[str]:
    """``--node nodeI=10.0.0.I[,fd=rackJ]`` for I in 1..count."""
    args: list[str] = []
    for i in range(1, count + 1):
        args += ["--node", f"node{i}=10.0.0.{i}" + (f",fd=rack{i % racks}" if racks else "")]
    return args


# --- the happy path ---------------------------------------------------------------------------------


def test_cluster_lifecycle(url: str, home: Path) -> None:
    def cli(*args: str) -> str:
        return ok(kahu(home, *args, etcd=url))

    # 2+2 with a hot spare: 7 nodes in 6 failure domains (node6 shares rack r5 with node5)
    racks = [f"node{i}=10.0.0.{i},fd=r{min(i, 5)}" for i in range(1, 7)]
    out = cli("cluster", "create", "demo", "-k", "2", "-m", "2", "--hot-spares", "1", "--node-timeout", "7",
              *(a for r in racks for a in ("--node", r)),
              "--node", "node7=10.0.0.7,port=4430,discovery-port=8010")
    assert out.startswith("cluster demo created: uuid ")
    assert out.endswith(", protection 2+2+1s, 7 node(s)\n")
    uuid = out.split("uuid ")[1].split(",")[0]

    nodes = json.loads(cli("node", "list", "--json"))
    assert [n["name"] for n in nodes] == [f"node{i}" for i in range(1, 8)]
    assert nodes[5] == {"name": "node6", "address": "10.0.0.6", "nvme_port": 4420, "discovery_port": 8009,
                        "failure_domain": "r5", "health": "unknown", "since": "-", "heartbeat": False,
                        "drives": 0, "manager": False}
    node7 = nodes[6]
    assert (node7["nvme_port"], node7["discovery_port"], node7["failure_domain"]) == (4430, 8010, "node7")
    table = cli("node", "list")
    header = ["NODE", "ADDRESS", "DOMAIN", "HEALTH", "SINCE", "DRIVES", "MANAGER"]
    assert table.split("\n")[0].split() == header
    assert "10.0.0.7:4430" in table

    assert cli("drive", "add", "node1", "/srv/kahu/d1.img", "--size", "1GiB") == (
        "drive 1 added to node node1\n")
    assert cli("drive", "add", "node2", "/srv/kahu/d1.img", "--size", "1GiB", "--block-size", "4096") == (
        "drive 2 added to node node2\n")
    assert cli("drive", "add", "node3", "/dev/nvme0n1") == "drive 3 added to node node3\n"
    assert cli("drive", "add", "node4", "0000:0a:00.0") == "drive 4 added to node node4\n"
    drives = json.loads(cli("drive", "list", "--json"))
    fields = ("id", "node", "kind", "source", "size", "state", "exported")
    assert [tuple(d[f] for f in fields) for d in drives] == [
        (1, "node1", "file", "/srv/kahu/d1.img", GiB, "active", False),
        (2, "node2", "file", "/srv/kahu/d1.img", GiB, "active", False),
        (3, "node3", "block_device", "/dev/nvme0n1", 0, "active", False),
        (4, "node4", "pci", "0000:0a:00.0", 0, "active", False),
    ]
    assert drives[0]["uuid"] != drives[1]["uuid"]  # one path on two nodes: two drives

    # usable = raw x k/(k+m) x (domains - spares)/domains = 2 GiB x 2/4 x 5/6 (6 domains: r1..r5, node7)
    usable = 2 * GiB * 2 * 5 // (4 * 6)
    assert cli("fs", "create", "data", "--capacity", "512MiB") == "file system data created (512MiB)\n"
    assert cli("fs", "create", "scratch", "--capacity", str(usable - 512 * MiB)).startswith(
        "file system scratch created")
    assert json.loads(cli("fs", "list", "--json")) == [
        {"name": "data", "id": 1, "capacity": 512 * MiB},
        {"name": "scratch", "id": 2, "capacity": usable - 512 * MiB}]
    assert [line.split() for line in cli("fs", "list").splitlines()][:2] == [
        ["NAME", "ID", "CAPACITY"], ["data", "1", "512MiB"]]

    assert cli("node", "add", "node8", "--address", "10.0.0.8", "--failure-domain", "r6") == (
        "node node8 added (10.0.0.8, failure domain r6)\n")
    assert cli("drive", "add", "node8", "/srv/kahu/d1.img", "--size", "512MiB") == (
        "drive 5 added to node node8\n")
    assert cli("drive", "remove", "4") == (
        "drive 4 on node4 is draining; it is removed once its data has moved\n")
    assert cli("fs", "delete", "scratch") == "file system scratch deleted\n"

    doc = json.loads(cli("status", "--json", "--events", "20"))
    assert doc["cluster"] == {"name": "demo", "uuid": uuid,
                              "protection": {"data": 2, "parity": 2, "hot_spares": 1},
                              "node_timeout": 7, "failure_domains": 7}
    assert [n["name"] for n in doc["nodes"]] == [f"node{i}" for i in range(1, 9)]
    assert doc["nodes_up"] == 0 and doc["manager"] is None
    assert {n["name"]: n["drives"] for n in doc["nodes"]}["node8"] == 1
    assert [m["healthy"] and m["leader"] for m in doc["etcd"]] == [True]
    assert doc["etcd"][0]["url"] == url
    raw = 2 * GiB + 512 * MiB
    assert doc["capacity"] == {"raw": raw, "usable": raw * 2 * 6 // (4 * 7), "provisioned": 512 * MiB}
    assert [d["id"] for d in doc["drives"]] == [1, 2, 3, 4, 5]
    assert doc["drives"][3]["state"] == "draining"
    assert doc["filesystems"] == [{"name": "data", "id": 1, "capacity": 512 * MiB}]
    every = ["cluster.created", *["drive.added"] * 4, "fs.created", "fs.created", "node.added", "drive.added",
             "drive.draining", "fs.deleted"]
    assert [e["kind"] for e in doc["events"]] == every
    assert doc["events"][0]["message"] == "cluster demo created with protection 2+2+1s, 7 node(s)"
    assert all(e["severity"] == "info" for e in doc["events"])
    assert [e["time"] for e in doc["events"]] == sorted(e["time"] for e in doc["events"])
    assert [e["kind"] for e in json.loads(cli("status", "--json"))["events"]] == every[-8:]  # default 8

    text = cli("status")
    assert text.startswith(f"cluster demo  ({uuid})\n")
    assert "protection 2+2, 1 hot spare(s); 7 failure domain(s); node timeout 7s" in text
    assert "nodes 0/8 up; manager none" in text
    assert "etcd etcd1 leader" in text
    assert "provisioned 512MiB" in text and "drives 0/5 exported" in text
    assert "file system scratch deleted" in text

    # a node without a heartbeat can leave (7 domains -> 6 still fit 2+2+1s); its drive is retired
    assert cli("node", "remove", "node8") == "node node8 removed; drives 5 removed with it\n"
    assert [d["id"] for d in json.loads(cli("drive", "list", "--json"))] == [1, 2, 3, 4]
    removed = json.loads(cli("drive", "list", "--json", "--all"))
    assert [(d["id"], d["state"]) for d in removed][-1] == (5, "removed")


def test_status_is_quick(cluster: str, home: Path) -> None:
    """`kahu status` answers in under a second (best of three, to ride out a busy machine)."""
    times = []
    for _ in range(3):
        began = time.monotonic()
        out = ok(kahu(home, "status", etcd=cluster))
        times.append(time.monotonic() - began)
        assert "cluster prepared" in out and "nodes 0/5 up" in out
    assert min(times) < 1.0, times


def test_second_endpoint_used_when_the_first_is_dead(cluster: str, home: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    doc = json.loads(ok(kahu(home, "status", "--json", etcd=f"{dead},{cluster}")))
    assert doc["cluster"]["name"] == "prepared"
    assert [n["heartbeat"] for n in doc["nodes"]] == [False, False, False, False, True]


# --- refusals ---------------------------------------------------------------------------------------

CREATE = ["cluster", "create", "c", "-k", "1", "-m", "2"]  # a 1+2 cluster named c

# Against an empty etcd: cluster creation refused, and every command before a cluster exists.
REFUSED_WITHOUT_CLUSTER: dict[str, tuple[list[str], str]] = {
    "policy-too-big": (["cluster", "create", "c", "-k", "4", "-m", "2", "--hot-spares", "1", *nodes_args(6)],
                       "need 7 failure domains, the cluster has 6"),
    "two-racks": (["cluster", "create", "c", "-k", "2", "-m", "2", *nodes_args(6, racks=2)],
                  "need 4 failure domains, the cluster has 2"),
    "m=1": (["cluster", "create", "c", "-k", "2", "-m", "1", *nodes_args(3)],
            "parity (m): must be an integer in 2..4, got 1"),
    "k=17": (["cluster", "create", "c", "-k", "17", "-m", "2", *nodes_args(3)],
             "data (k): must be an integer in 1..16, got 17"),
    "node-timeout": ([*CREATE, "--node-timeout", "1", *nodes_args(3)],
                     "node timeout: must be an integer in 3..600, got 1"),
    "node-timeout-0": ([*CREATE, "--node-timeout", "0", *nodes_args(3)],
                       "node timeout: must be an integer in 3..600, got 0"),
    "node-without-address": ([*CREATE, "--node", "node1"],
                             "--node 'node1': must look like NAME=ADDRESS[,fd=DOMAIN][,port=P]"),
    "node-not-an-ip": ([*CREATE, "--node", "node1=notanip"],
                       "node node1: address: must be an IPv4 or IPv6 address, got 'notanip'"),
    "node-bogus-option": ([*CREATE, "--node", "node1=10.0.0.1,bogus=1"],
                          "--node 'node1=10.0.0.1,bogus=1': unknown option 'bogus=1' (known: fd, port,"),
    "node-port-not-a-number": ([*CREATE, "--node", "n=10.0.0.1,port=x"], "port must be a number"),
    "node-bad-name": ([*CREATE, "--node", "no/de=10.0.0.1"], "node name: must be 1..63 letters"),
    "duplicate-nodes": ([*CREATE, *nodes_args(3), "--node", "node2=10.0.0.9"], "node node2 already exists"),
    "same-address": ([*CREATE, *nodes_args(3), "--node", "node4=10.0.0.3"],
                     "node node4: 10.0.0.3 port 4420 is already used by node node3"),
    "bad-cluster-name": (["cluster", "create", "bad/name", "-k", "1", "-m", "2", *nodes_args(3)],
                         "cluster name: must be"),
    "status": (["status"], NO_CLUSTER),
    "status-json": (["status", "--json"], NO_CLUSTER),
    "node-list": (["node", "list"], NO_CLUSTER),
    "node-add": (["node", "add", "node1", "--address", "10.0.0.1"], NO_CLUSTER),
    "node-remove": (["node", "remove", "node1"], NO_CLUSTER),
    "drive-add": (["drive", "add", "node1", "/srv/d.img", "--size", "1GiB"], NO_CLUSTER),
    "drive-list": (["drive", "list"], NO_CLUSTER),
    "drive-remove": (["drive", "remove", "1"], NO_CLUSTER),
    "fs-create": (["fs", "create", "x", "--capacity", "1GiB"], NO_CLUSTER),
    "fs-list": (["fs", "list", "--json"], NO_CLUSTER),
    "fs-delete": (["fs", "delete", "x"], NO_CLUSTER),
}

ADD_X = ["drive", "add", "node1", "/srv/x.img"]  # a new file drive on node1

# Against the prepared cluster (see the ``cluster`` fixture).
REFUSED_WITH_CLUSTER: dict[str, tuple[list[str], str]] = {
    "create-again": ([*CREATE, *nodes_args(3)], "cluster prepared already exists here"),
    "drive-unknown-node": (["drive", "add", "node9", "/srv/x.img", "--size", "1GiB"],
                           "no node 'node9' (nodes: node1, node2, node3, node4, node5)"),
    "drive-file-without-size": (ADD_X, "drive /srv/x.img: a file drive needs --size"),
    "drive-relative-path": (["drive", "add", "node1", "x.img", "--size", "1GiB"],
                            "drive 'x.img': a file drive needs an absolute path on its node"),
    "drive-size-on-a-device": (["drive", "add", "node1", "/dev/sdb", "--size", "1GiB"],
                               "--size: only a file drive takes a size"),
    "drive-size-on-pci": (["drive", "add", "node1", "0000:0a:00.0", "--size", "1GiB"],
                          "--size: only a file drive takes a size"),
    "drive-decimal-size": ([*ADD_X, "--size", "1GB"], "size: must be a size like 64MiB (binary units)"),
    "drive-size-garbage": ([*ADD_X, "--size", "big"], "size: must be a size like 64MiB"),
    "drive-size-odd": ([*ADD_X, "--size", "1000"], "size 1000 is not a multiple of block_size 512"),
    "drive-same-source": (["drive", "add", "node1", "/srv/d1.img", "--size", "1GiB"],
                          "node node1 already has /srv/d1.img as drive 1"),
    "drive-remove-unknown": (["drive", "remove", "99"], "no drive 99"),
    "fs-capacity-garbage": (["fs", "create", "x", "--capacity", "lots"],
                            "--capacity: must be a size like 64MiB"),
    "fs-capacity-zero": (["fs", "create", "x", "--capacity", "0"], "--capacity: must be positive"),
    "fs-too-big": (["fs", "create", "x", "--capacity", "1TiB"],
                   "file system x: 1TiB does not fit: 819MiB usable, 256MiB already provisioned"),
    "fs-just-too-big": (["fs", "create", "x", "--capacity", str(PREPARED_USABLE - 256 * MiB + 1)],
                        "does not fit"),
    "fs-duplicate": (["fs", "create", "data", "--capacity", "1MiB"], "file system data already exists"),
    "fs-bad-name": (["fs", "create", "a b", "--capacity", "1MiB"], "file system name: must be"),
    "fs-delete-unknown": (["fs", "delete", "nope"], "no file system 'nope'"),
    "node-remove-up": (["node", "remove", "node5"], "node node5 is up (its backend is running)"),
    "node-remove-policy": (["node", "remove", "node4", "--force"],
                           "2+2 stripes plus 1 hot spare(s) need 5 failure domains, the cluster has 4"),
    "node-remove-unknown": (["node", "remove", "node9"], "no node 'node9'"),
    "node-add-duplicate": (["node", "add", "node1", "--address", "10.0.0.50"], "node node1 already exists"),
    "node-add-same-address": (["node", "add", "node6", "--address", "10.0.0.1"],
                              "node node6: 10.0.0.1 port 4420 is already used by node node1"),
    "node-add-bad-address": (["node", "add", "node6", "--address", "10.0.0"],
                             "node node6: address: must be an IPv4 or IPv6 address"),
    "node-add-bad-port": (["node", "add", "node6", "--address", "10.0.0.6", "--port", "70000"],
                          "nvme port: must be a port number in 1..65535, got 70000"),
}


@pytest.mark.parametrize("case", list(REFUSED_WITHOUT_CLUSTER))
def test_refused_without_cluster(url: str, home: Path, case: str) -> None:
    args, expected = REFUSED_WITHOUT_CLUSTER[case]
    before = snapshot(url)
    failed(kahu(home, *args, etcd=url), expected)
    assert snapshot(url) == before
    assert before[0] == {}


@pytest.mark.parametrize("case", list(REFUSED_WITH_CLUSTER))
def test_refused_with_cluster(cluster: str, home: Path, case: str) -> None:
    args, expected = REFUSED_WITH_CLUSTER[case]
    before = snapshot(cluster)
    failed(kahu(home, *args, etcd=cluster), expected)
    assert snapshot(cluster) == before


@pytest.mark.parametrize("args", [
    [],
    ["cluster"],
    ["cluster", "create", "c"],
    ["cluster", "create", "c", "-k", "two", "-m", "2"],
    ["node", "add", "node9"],
    ["node", "add", "node9", "--address", "10.0.0.9", "--port", "http"],
    ["drive", "add", "node1"],
    ["drive", "add", "node1", "/srv/x.img", "--block-size", "1000"],
    ["drive", "remove", "one"],
    ["fs", "create", "x"],
    ["fs", "delete"],
    ["status", "--bogus"],
], ids=lambda args: "-".join(args) or "nothing")
def test_argparse_misuse_exits_2(cluster: str, home: Path, args: list[str]) -> None:
    before = snapshot(cluster)
    result = kahu(home, *args, etcd=cluster)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "usage: kahu" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert snapshot(cluster) == before


# --- etcd unreachable or misnamed --------------------------------------------------------------------


def test_unreachable_etcd_fails_within_the_cli_timeout(home: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    began = time.monotonic()
    result = kahu(home, "status", etcd=dead, timeout=20)
    elapsed = time.monotonic() - began
    line = failed(result, "no member answered")
    assert dead in line
    assert elapsed < 8.0, elapsed


@pytest.mark.parametrize("etcd, expected", [
    ("notaurl", "--etcd: 'notaurl' is not a URL like http://10.0.0.1:2379"),
    ("http://127.0.0.1:1,ftp://x", "--etcd: 'ftp://x' is not a URL"),
    (",", "--etcd: give at least one URL"),
])
def test_bad_etcd_argument(home: Path, etcd: str, expected: str) -> None:
    began = time.monotonic()
    failed(kahu(home, "status", etcd=etcd), expected)
    assert time.monotonic() - began < 5.0


def test_etcd_from_the_environment(cluster: str, home: Path) -> None:
    """$KAHU_ETCD is used when --etcd is not given (and --etcd wins over it)."""
    env = {**os.environ, "KAHU_HOME": str(home), "KAHU_ETCD": cluster}
    result = subprocess.run([sys.executable, "-m", "appliance.cli.main", "fs", "list", "--json"], cwd=REPO,
                            capture_output=True, text=True, timeout=CLI_TIMEOUT, env=env)
    assert json.loads(ok(result)) == [{"name": "data", "id": 1, "capacity": 256 * MiB}]
    env["KAHU_ETCD"] = "notaurl"
    result = subprocess.run([sys.executable, "-m", "appliance.cli.main", "fs", "list", "--etcd", cluster],
                            cwd=REPO, capture_output=True, text=True, timeout=CLI_TIMEOUT, env=env)
    assert "data" in ok(result)
