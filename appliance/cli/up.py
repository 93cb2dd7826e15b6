"""``kahu up`` / ``kahu down``: the one-machine cluster, started in the background and stopped cleanly.

``kahu up`` starts a supervisor in its own session (``kahu up --foreground`` is the supervisor) and
waits until it says the cluster serves, then prints the status. The supervisor holds a lock on
``HOME/up.lock`` for its whole life, so a second ``kahu up`` knows the first still runs, and a
supervisor that died is never mistaken for a live one. It restarts any of its processes that die
(with backoff) and on SIGTERM stops them all, backends first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import select
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..cluster.etcd import Etcd, EtcdError
from ..cluster.etcd_server import EtcdStartError
from ..cluster.local import LocalCluster, netns_possible, resolve_spec
from ..cluster.schema import ClusterError
from ..cluster.store import ClusterStore
from ..home import RUNNING_FILE, running_record
from ..procs import kahu_command, kahu_env, notify
from ..units import parse_size
from .context import home_of
from .status import gather_status, render

LOCK_FILE = "up.lock"
UP_TIMEOUT = 120.0
DOWN_TIMEOUT = 60.0
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0)

log = logging.getLogger("kahu.up")


def register(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser("up", help="start the one-machine cluster (etcd, nodes, drive targets)")
    up.add_argument("--nodes", type=int, help="how many nodes (default 6)")
    up.add_argument("--etcd-members", type=int, help="etcd members on the first nodes: 1, 3 or 5 (default 3)")
    up.add_argument("--drives-per-node", type=int, help="file-backed drives per node (default 1)")
    up.add_argument("--drive-size", help="size of each drive file, created sparse (default 1GiB)")
    up.add_argument("--node-timeout", type=int, help="seconds without a heartbeat before a node is down")
    up.add_argument("--loopback", action="store_true",
                    help="share loopback with distinct ports instead of a network namespace per node")
    up.add_argument("--subnet", help="the nodes' network in the namespace layout (default 10.77.0.0/24)")
    up.add_argument("--base-port", type=int, help="first port of the loopback layout (default 24000)")
    up.add_argument("--soft", action="store_true", default=None,
                    help="use the soft NVMe/TCP target even where SPDK is installed")
    up.add_argument("--home", type=Path, help="where etcd data, drive files and logs live "
                                              "(default: $KAHU_HOME, /var/lib/kahu as root)")
    up.add_argument("--foreground", action="store_true", help=argparse.SUPPRESS)
    up.add_argument("--notify-fd", type=int, help=argparse.SUPPRESS)
    up.set_defaults(func=bring_up)

    down = subparsers.add_parser("down", help="stop the one-machine cluster (its state is kept)")
    down.add_argument("--home", type=Path, help="as for kahu up")
    down.set_defaults(func=bring_down)


def requested_spec(args: argparse.Namespace) -> dict[str, Any]:
    netns = False if args.loopback else (None if netns_possible() else False)
    size = parse_size(args.drive_size, "--drive-size", ClusterError) if args.drive_size else None
    return {"nodes": args.nodes, "etcd_members": args.etcd_members, "drives_per_node": args.drives_per_node,
            "drive_size": size, "node_timeout": args.node_timeout, "netns": netns, "subnet": args.subnet,
            "base_port": args.base_port, "soft": args.soft}


def lock_holder(home: Path) -> int | None:
    """The PID of the live supervisor of ``home``, or None when nobody holds the lock."""
    path = home / LOCK_FILE
    if not path.exists():
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = running_record(home) or {}
            return int(record.get("supervisor_pid") or 0) or -1
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


# --- kahu up --------------------------------------------------------------------------------------


def bring_up(args: argparse.Namespace) -> int:
    home = home_of(args).resolve()
    if args.foreground:
        return supervise(home, requested_spec(args), args.notify_fd)
    pid = lock_holder(home)
    if pid is not None:
        print(f"kahu is already running from {home} (supervisor pid {pid}); see `kahu status`, "
              "stop it with `kahu down`")
        return 0
    home.mkdir(parents=True, exist_ok=True)
    resolve_spec(home, requested_spec(args))  # refuse contradicting options before starting anything
    began = time.monotonic()
    read_fd, write_fd = os.pipe()
    # The spec is now stored in home: the supervisor reads it from there.
    argv = kahu_command("up", "--foreground", "--home", str(home), "--notify-fd", str(write_fd))
    log_path = home / "logs" / "supervisor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(write_fd,),
                                env=kahu_env(), start_new_session=True)
    os.close(write_fd)
    message = _read_notification(read_fd, UP_TIMEOUT)
    if not message.startswith("READY"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        print(f"kahu up: failed: {message or 'the supervisor exited'}\n(see {log_path})", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - began
    record = running_record(home) or {}
    print(render(asyncio.run(_status(record.get("etcd", [])))))
    print(f"\nkahu is up in {elapsed:.1f}s (home {home}); `kahu status` shows it, `kahu down` stops it")
    return 0


def _read_notification(fd: int, timeout: float) -> str:
    """One line from the supervisor's readiness pipe: READY, or ERROR with the reason; "" if it died."""
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return f"not up within {timeout:.0f}s"
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return data.decode(errors="replace").strip()


async def _status(endpoints: list[str]) -> dict[str, Any]:
    async with Etcd(endpoints) as etcd:
        return await gather_status(ClusterStore(etcd))


# --- the supervisor -------------------------------------------------------------------------------


def supervise(home: Path, requested: dict[str, Any], notify_fd: int | None) -> int:
    """Run the cluster until SIGTERM/SIGINT: the body of `kahu up`'s background process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(levelname)s: %(message)s")
    home.mkdir(parents=True, exist_ok=True)
    lock = open(home / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the whole life of the process
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        notify(notify_fd, "ERROR another kahu up already runs from " + str(home))
        return 1
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    cluster: LocalCluster | None = None
    try:
        spec = resolve_spec(home, requested)
        cluster = LocalCluster(home, spec)
        elapsed = cluster.start()
        (home / RUNNING_FILE).write_text(json.dumps(cluster.record(os.getpid()), indent=2) + "\n")
        log.info("cluster up in %.1fs: %d nodes, etcd %s", elapsed, spec.nodes, ",".join(cluster.endpoints))
        notify(notify_fd, "READY")
        notify_fd = None
        _watch(cluster, wake_r, stopping)
        log.info("stopping")
        return 0
    except (ClusterError, EtcdStartError, EtcdError, OSError, ValueError) as e:
        log.error("%s", e)
        notify(notify_fd, f"ERROR {e}")
        return 1
    finally:
        if cluster is not None:
            cluster.stop()
        with contextlib.suppress(FileNotFoundError):
            (home / RUNNING_FILE).unlink()
        lock.close()


def _watch(cluster: LocalCluster, wake_fd: int, stopping: list[bool]) -> None:
    """Wait for a stop signal or a child's death; restart dead children with backoff."""
    failures: dict[str, int] = {}
    restart_at: dict[str, float] = {}
    with selectors.DefaultSelector() as sel:
        sel.register(wake_fd, selectors.EVENT_READ, None)
        watched: dict[str, int] = {}

        def watch(name: str, pid: int | None) -> None:
            if pid is not None:
                fd = os.pidfd_open(pid)
                watched[name] = fd
                sel.register(fd, selectors.EVENT_READ, name)

        for name, proc in cluster.backends.items():
            watch(name, proc.pid)
        assert cluster.etcd is not None
        for member in cluster.etcd.members:
            watch(member.name, cluster.etcd.pid(member.name))
        try:
            while not stopping:
                timeout = max(0.0, min(restart_at.values()) - time.monotonic()) if restart_at else None
                for key, _ in sel.select(timeout):
                    if key.data is None:
                        os.read(wake_fd, 512)
                        continue
                    name = key.data
                    sel.unregister(key.fd)
                    os.close(watched.pop(name))
                    if _exited_cleanly(cluster, name):
                        log.info("%s left the cluster; not restarting it", name)
                        continue
                    delay = RESTART_DELAYS[min(failures.get(name, 0), len(RESTART_DELAYS) - 1)]
                    failures[name] = failures.get(name, 0) + 1
                    log.warning("%s died; restarting in %.1fs", name, delay)
                    restart_at[name] = time.monotonic() + delay
                for name, when in list(restart_at.items()):
                    if when <= time.monotonic() and not stopping:
                        del restart_at[name]
                        try:
                            watch(name, _restart(cluster, name))
                        except (ClusterError, OSError) as e:
                            log.error("restarting %s failed: %s", name, e)
                            restart_at[name] = time.monotonic() + RESTART_DELAYS[-1]
        finally:
            for fd in watched.values():
                os.close(fd)


def _exited_cleanly(cluster: LocalCluster, name: str) -> bool:
    proc = cluster.backends.get(name)
    return proc is not None and proc.wait() == 0


def _restart(cluster: LocalCluster, name: str) -> int | None:
    assert cluster.etcd is not None
    if name in cluster.backends:
        cluster.start_node(name)
        return cluster.backends[name].pid
    cluster.etcd.start_member(name)
    return cluster.etcd.pid(name)


# --- kahu down ------------------------------------------------------------------------------------


def bring_down(args: argparse.Namespace) -> int:
    home = home_of(args).resolve()
    pid = lock_holder(home)
    if pid is None:
        print(f"kahu is not running from {home}")
        return 0
    if pid <= 0:
        raise ClusterError(f"{home / LOCK_FILE} is held but {home / RUNNING_FILE} names no supervisor; "
                           "is `kahu up` still starting?")
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGTERM)
        if not select.select([pidfd], [], [], DOWN_TIMEOUT)[0]:
            raise ClusterError(f"the supervisor (pid {pid}) did not stop within {DOWN_TIMEOUT:.0f}s")
    finally:
        os.close(pidfd)
    print(f"kahu stopped (home {home}; its state is kept for the next `kahu up`)")
    return 0
