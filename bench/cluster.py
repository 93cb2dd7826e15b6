"""Cluster-state benchmark: how fast Kahu's control plane is, next to raw etcd measured in the same run.

- writes: a raw etcd put (the yardstick) vs a validated admin change (read the whole config, check,
  one conditional transaction with its event);
- ``kahu status``: in-process and as a CLI process, vs ``etcdctl get`` (a CLI round trip to etcd);
- start-up: a whole one-machine cluster from nothing to every node healthy, vs its etcd alone;
- failure detection: a crashed node and (as root) a cut link until marked down, vs the node timeout;
- etcd leader killed: the longest write stall while clients fail over, vs the election timeout.

Prints a table, writes ``bench/results/cluster.json`` and a PNG of write latency around the leader kill.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "soft"))

from clusters import cluster_spec, health_of, until  # noqa: E402

from appliance.cli.status import gather_status  # noqa: E402
from appliance.cluster.etcd import Etcd  # noqa: E402
from appliance.cluster.local import LocalCluster  # noqa: E402
from appliance.cluster.schema import Node  # noqa: E402
from appliance.cluster.store import ClusterStore  # noqa: E402

RESULTS = REPO / "bench" / "results"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values]
    return {"p50_ms": round(pct(ms, 0.5), 3), "p99_ms": round(pct(ms, 0.99), 3),
            "mean_ms": round(statistics.fmean(ms), 3), "n": len(ms)}


async def timed(action: Any, count: int) -> list[float]:
    out = []
    for i in range(count):
        began = time.perf_counter()
        await action(i)
        out.append(time.perf_counter() - began)
    return out


async def writes(endpoints: list[str], count: int) -> dict[str, Any]:
    async with Etcd(endpoints) as etcd:
        store = ClusterStore(etcd)
        raw = await timed(lambda i: etcd.put(f"/bench/raw/{i}", b"x" * 200), count)
        add = await timed(lambda i: store.add_node(Node(f"bench{i}", "127.0.0.1", "", 40000 + 2 * i,
                                                        40001 + 2 * i)), count // 4)
        fs = await timed(lambda i: store.create_fs(f"bench{i}", 1 << 20), count // 4)
        await etcd.delete("/bench/", prefix=True)
        status = await timed(lambda i: gather_status(store), count // 4)
        for i in range(count // 4):
            await store.delete_fs(f"bench{i}")
            await store.remove_node(f"bench{i}", force=True)
    return {"raw_put": summary(raw), "add_node": summary(add), "create_fs": summary(fs),
            "status_in_process": summary(status)}


def cli_times(endpoints: list[str], runs: int) -> dict[str, Any]:
    def wall(argv: list[str]) -> float:
        began = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, timeout=30, cwd=REPO)
        return time.perf_counter() - began

    status = [wall([sys.executable, "-m", "appliance.cli.main", "status", "--etcd", ",".join(endpoints)])
              for _ in range(runs)]
    out = {"kahu_status": summary(status)}
    if shutil.which("etcdctl"):
        argv = ["etcdctl", "--endpoints", ",".join(endpoints), "get", "/kahu/schema"]
        get = [wall(argv) for _ in range(runs)]
        out["etcdctl_get"] = summary(get)
    return out


async def detection(cluster: LocalCluster, node_timeout: int) -> dict[str, Any]:
    out: dict[str, Any] = {"node_timeout_s": node_timeout}
    async with Etcd(cluster.endpoints) as etcd:
        async def state(name: str, want: str) -> None:
            async def check(s: ClusterStore) -> bool:
                return await health_of(s, name) == want
            await until(etcd, check, 30, f"{name} {want}")

        async def transition(key: str, action: Any, want: str) -> None:
            began = time.monotonic()
            await asyncio.to_thread(action, victim)
            await state(victim, want)
            out[key] = round(time.monotonic() - began, 2)

        victim = cluster.names[-1]
        await transition("crash_to_down_s", cluster.kill_node, "down")
        await transition("restart_to_up_s", cluster.start_node, "up")
        if cluster.topology is not None:
            await transition("cut_to_down_s", cluster.cut_link, "down")
            await transition("restore_to_up_s", cluster.restore_link, "up")
    return out


async def leader_kill(cluster: LocalCluster, election_ms: int) -> dict[str, Any]:
    """Sequential writes for a while around killing the etcd leader: the longest stall is the cost."""
    assert cluster.etcd is not None
    leader = await asyncio.to_thread(cluster.etcd.leader)
    samples: list[tuple[float, float]] = []
    async with Etcd(cluster.endpoints) as etcd:
        start = time.monotonic()
        killed_at = None
        i = 0
        while time.monotonic() - start < 4.0:
            if killed_at is None and time.monotonic() - start > 1.0:
                await asyncio.to_thread(cluster.etcd.kill_member, leader)
                killed_at = time.monotonic() - start
            began = time.monotonic()
            await etcd.put(f"/bench/leader/{i}", b"x")
            samples.append((began - start, time.monotonic() - began))
            i += 1
        await etcd.delete("/bench/", prefix=True)
    await asyncio.to_thread(cluster.etcd.start_member, leader)
    return {"election_timeout_ms": election_ms, "killed_at_s": killed_at,
            "max_write_stall_ms": round(max(d for _, d in samples) * 1e3, 1),
            "writes": len(samples), "samples": samples}


def plot(samples: list[tuple[float, float]], killed_at: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([t for t, _ in samples], [d * 1e3 for _, d in samples], ".", markersize=3)
    ax.axvline(killed_at, color="red", linestyle="--", label="etcd leader killed")
    ax.set_yscale("log")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("put latency (ms)")
    ax.set_title("Writes through Kahu's etcd client while the etcd leader dies")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--writes", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args()
    count = 80 if args.quick else args.writes
    node_timeout = 3
    home = Path(tempfile.mkdtemp(prefix="kahu-bench-"))
    spec = cluster_spec(nodes=args.nodes, etcd_members=3, node_timeout=node_timeout)
    cluster = LocalCluster(home, spec)
    results: dict[str, Any] = {"nodes": args.nodes, "layout": "netns" if spec.netns else "loopback"}
    try:
        began = time.monotonic()
        cluster.start()
        results["startup"] = {"cluster_s": round(time.monotonic() - began, 2)}
        results["writes"] = asyncio.run(writes(cluster.endpoints, count))
        results["cli"] = cli_times(cluster.endpoints, 5 if args.quick else 10)
        results["detection"] = asyncio.run(detection(cluster, node_timeout))
        results["leader_kill"] = asyncio.run(leader_kill(cluster, spec.etcd_election_ms))
    finally:
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)
    etcd_only = LocalCluster(Path(tempfile.mkdtemp(prefix="kahu-bench-")), spec)
    try:  # the yardstick for start-up: just the etcd part of the same layout
        etcd_only.start_network()
        began = time.monotonic()
        etcd_only.start_etcd()
        results["startup"]["etcd_alone_s"] = round(time.monotonic() - began, 2)
    finally:
        etcd_only.stop()
        shutil.rmtree(etcd_only.home, ignore_errors=True)

    report(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    samples = results["leader_kill"].pop("samples")
    plot(samples, results["leader_kill"]["killed_at_s"], RESULTS / "cluster_leader_kill.png")
    (RESULTS / "cluster.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nJSON: {RESULTS / 'cluster.json'}, plot: {RESULTS / 'cluster_leader_kill.png'}")
    return 0


def report(r: dict[str, Any]) -> None:
    w, c, d, k = r["writes"], r["cli"], r["detection"], r["leader_kill"]
    def lat(d: dict[str, float]) -> str:
        return f"p50 {d['p50_ms']} ms, p99 {d['p99_ms']} ms"

    rows = [
        ("raw etcd put (yardstick)", lat(w["raw_put"])),
        ("kahu node add (validated txn)", lat(w["add_node"])),
        ("kahu fs create (validated txn)", lat(w["create_fs"])),
        ("status gathered in-process", lat(w["status_in_process"])),
        ("kahu status (CLI process)", lat(c["kahu_status"])),
    ]
    if "etcdctl_get" in c:
        rows.append(("etcdctl get (yardstick)", lat(c["etcdctl_get"])))
    rows += [
        (f"start {r['nodes']} nodes ({r['layout']})", f"{r['startup']['cluster_s']} s"),
        ("start etcd alone (yardstick)", f"{r['startup'].get('etcd_alone_s', '?')} s"),
        (f"crash -> down (timeout {d['node_timeout_s']} s)", f"{d['crash_to_down_s']} s"),
        ("restart -> up", f"{d['restart_to_up_s']} s"),
    ]
    if "cut_to_down_s" in d:
        rows += [("cut link -> down", f"{d['cut_to_down_s']} s"),
                 ("restore -> up", f"{d['restore_to_up_s']} s")]
    rows.append((f"etcd leader kill: longest write stall (election {k['election_timeout_ms']} ms)",
                 f"{k['max_write_stall_ms']} ms over {k['writes']} writes"))
    width = max(len(a) for a, _ in rows)
    print(f"{'measure':<{width}}  result")
    for a, b in rows:
        print(f"{a:<{width}}  {b}")


if __name__ == "__main__":
    sys.exit(main())
