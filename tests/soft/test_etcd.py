"""The etcd client (appliance.cluster.etcd) against real etcd members (appliance.cluster.etcd_server) on
loopback: key-values, transactions, leases, watches, fail-over when members or the leader die, bounded
errors, members rejoining, and members that cannot start."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from clusters import free_ports, make_etcd
from conftest import run

from appliance.cluster import etcd_server
from appliance.cluster.etcd import (
    Etcd,
    EtcdError,
    EtcdUnavailable,
    WatchEvent,
    delete_op,
    mod_revision_is,
    put_op,
    range_op,
    value_is,
    version_is,
)
from appliance.cluster.etcd_server import EtcdCluster, EtcdStartError


@pytest.fixture
def etcd1(tmp_path: Path) -> Iterator[EtcdCluster]:
    with make_etcd(tmp_path, 1) as cluster:
        yield cluster


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    with make_etcd(tmp_path, 3) as cluster:
        yield cluster


class Watcher:
    """A watch consumed by a background task into a queue, so a scenario can await each event."""

    def __init__(self, etcd: Etcd, prefix: str, start_revision: int):
        self.events: asyncio.Queue[WatchEvent] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(etcd, prefix, start_revision))

    async def _pump(self, etcd: Etcd, prefix: str, start_revision: int) -> None:
        async with contextlib.aclosing(etcd.watch(prefix, start_revision)) as events:
            async for event in events:
                self.events.put_nowait(event)

    async def next(self, timeout: float = 5.0) -> WatchEvent:
        getter = asyncio.ensure_future(self.events.get())
        done, _ = await asyncio.wait({getter, self._task}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if getter in done:
            return getter.result()
        getter.cancel()
        if self._task in done:
            raise AssertionError(f"watch ended: {self._task.exception()!r}")
        raise AssertionError(f"no watch event within {timeout}s")

    async def ended(self, timeout: float) -> BaseException | None:
        """Wait for the watch to end; returns what it raised."""
        await asyncio.wait({self._task}, timeout=timeout)
        assert self._task.done(), f"watch still running after {timeout}s"
        return self._task.exception()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


@contextlib.asynccontextmanager
async def watching(etcd: Etcd, prefix: str, start_revision: int) -> AsyncIterator[Watcher]:
    watcher = Watcher(etcd, prefix, start_revision)
    try:
        yield watcher
    finally:
        await watcher.close()


def name_at(cluster: EtcdCluster, index: int) -> str:
    return cluster.members[index].name


# --- key-values ------------------------------------------------------------------------------------


def test_put_get_prefix_delete(etcd1: EtcdCluster) -> None:
    async def scenario() -> None:
        async with Etcd(etcd1.endpoints) as etcd:
            assert await etcd.get("missing") is None
            binary = bytes(range(256))
            first = await etcd.put("bin", binary)
            kv = await etcd.get("bin")
            assert kv is not None and kv.value == binary and isinstance(kv.value, bytes)
            assert (kv.mod_revision, kv.create_revision, kv.version) == (first, first, 1)
            second = await etcd.put("bin", "text")
            kv = await etcd.get("bin")
            assert kv is not None and kv.value == b"text"
            assert (kv.mod_revision, kv.create_revision, kv.version) == (second, first, 2)

            for key in ("k/b", "k/a", "k/c", "k0", "k"):  # "k0" is where the prefix "k/" ends
                latest = await etcd.put(key, key.upper())
            kvs, revision = await etcd.get_prefix_at("k/")
            assert [(kv.key, kv.value) for kv in kvs] == [("k/a", b"K/A"), ("k/b", b"K/B"), ("k/c", b"K/C")]
            assert revision == latest  # the store's revision, to watch from revision + 1
            assert [kv.key for kv in await etcd.get_prefix("")] == ["bin", "k", "k/a", "k/b", "k/c", "k0"]

            assert await etcd.delete("k/", prefix=True) == 3
            assert await etcd.get_prefix("k/") == []
            assert await etcd.delete("k/a") == 0
            assert await etcd.delete("k0") == 1
            assert [kv.key for kv in await etcd.get_prefix("")] == ["bin", "k"]

    run(scenario())


def test_txn_create_if_absent_compare_and_swap_atomic(etcd1: EtcdCluster) -> None:
    async def scenario() -> None:
        async with Etcd(etcd1.endpoints) as etcd:
            # create-if-absent: the loser learns who holds the key
            claims = [await etcd.txn([version_is("owner", 0)], [put_op("owner", who)], [range_op("owner")])
                      for who in ("me", "you")]  # fmt: skip
            assert [c.succeeded for c in claims] == [True, False]
            assert [[kv.value for kv in r] for r in claims[1].ranges()] == [[b"me"]]
            assert claims[0].ranges() == []  # the success branch had no range

            # compare-and-swap on the revision read: a stale writer loses
            await etcd.put("counter", "1")
            read = await etcd.get("counter")
            assert read is not None
            swap = await etcd.txn([mod_revision_is("counter", read.mod_revision)], [put_op("counter", "2")])
            stale = await etcd.txn([mod_revision_is("counter", read.mod_revision)], [put_op("counter", "3")])
            assert (swap.succeeded, stale.succeeded) == (True, False)
            assert stale.revision == swap.revision  # nothing was written
            assert (await etcd.get("counter")).value == b"2"  # type: ignore[union-attr]
            assert (await etcd.txn([value_is("counter", "2")], [delete_op("counter")])).succeeded
            assert await etcd.get("counter") is None

            # two keys in one transaction: one revision for both ...
            both = await etcd.txn([], [put_op("pair/a", "1"), put_op("pair/b", "1")])
            assert [kv.mod_revision for kv in await etcd.get_prefix("pair/")] == [both.revision] * 2
            # ... and a transaction etcd refuses (the lease does not exist) changes neither
            with pytest.raises(EtcdError, match="lease not found"):
                await etcd.txn([], [put_op("pair/a", "2"), put_op("pair/b", "2", lease=0x7E57)])
            assert [kv.value for kv in await etcd.get_prefix("pair/")] == [b"1", b"1"]
            cleared = await etcd.txn([], [delete_op("pair/", prefix=True), range_op("pair/", prefix=True)])
            assert cleared.ranges() == [[]]  # the range inside the transaction sees the delete before it

    run(scenario())


# --- leases ----------------------------------------------------------------------------------------


def test_lease_expiry_deletes_its_keys(etcd1: EtcdCluster) -> None:
    async def scenario() -> None:
        async with Etcd(etcd1.endpoints) as etcd:
            lease, ttl = await etcd.lease_grant(1)
            assert ttl == 1  # the minimum with a 500 ms election timeout
            granted = time.monotonic()
            await etcd.put("live/node1", "up", lease=lease)
            revision = await etcd.put("live/static", "stays")
            kv = await etcd.get("live/node1")
            assert kv is not None and kv.lease == lease
            async with watching(etcd, "live/", revision + 1) as watcher:
                event = await watcher.next(timeout=5)
            assert (event.kind, event.kv.key) == ("delete", "live/node1")
            assert event.prev is not None and event.prev.value == b"up"
            assert time.monotonic() - granted >= 0.8  # it expired, it was not dropped at once
            assert [kv.key for kv in await etcd.get_prefix("live/")] == ["live/static"]
            assert await etcd.lease_keepalive(lease) == 0

    run(scenario())


def test_lease_keepalive_and_revoke(etcd1: EtcdCluster) -> None:
    async def scenario() -> None:
        async with Etcd(etcd1.endpoints) as etcd:
            lease, ttl = await etcd.lease_grant(1)
            revision = await etcd.put("live/node1", "up", lease=lease)
            async with watching(etcd, "live/", revision + 1) as watcher:
                deadline = time.monotonic() + 2 * ttl
                while time.monotonic() < deadline:  # two TTLs, refreshed well within each
                    assert await etcd.lease_keepalive(lease) == ttl
                    await asyncio.sleep(ttl / 4)  # the keep-alive period, not synchronisation
                assert watcher.events.empty()
                assert (await etcd.get("live/node1")) is not None
                await etcd.lease_revoke(lease)
                assert await etcd.get("live/node1") is None  # revoking deletes at once, not at expiry
                event = await watcher.next()
                assert (event.kind, event.kv.key) == ("delete", "live/node1")
            assert await etcd.lease_keepalive(lease) == 0
            await etcd.lease_revoke(lease)  # a second revoke is not an error
            with pytest.raises(EtcdError, match="lease not found"):
                await etcd.put("live/node1", "up", lease=lease)

    run(scenario())


# --- watches ---------------------------------------------------------------------------------------


def test_watch_delivers_history_in_order_with_prev_values(etcd1: EtcdCluster) -> None:
    async def scenario() -> None:
        async with Etcd(etcd1.endpoints) as etcd:
            await etcd.put("w/ignored", "before the start revision")
            start = await etcd.put("w/a", "1")
            await etcd.put("w/a", "2")
            pair = await etcd.txn([], [put_op("w/b", "b"), put_op("w/c", "c")])  # two events, one revision
            await etcd.put("other/x", "not under the prefix")
            await etcd.delete("w/a")
            big = b"x" * 1_000_000  # with its previous value: one 2.7 MB watch message
            await etcd.put("w/big", big)
            await etcd.put("w/big", big[::-1] + b"!")
            expected = [("put", "w/a", b"1", None), ("put", "w/a", b"2", b"1"), ("put", "w/b", b"b", None),
                        ("put", "w/c", b"c", None), ("delete", "w/a", b"", b"2"), ("put", "w/big", big, None),
                        ("put", "w/big", big[::-1] + b"!", big)]  # fmt: skip
            async with watching(etcd, "w/", start) as watcher:
                events = [await watcher.next() for _ in expected]
                late = await etcd.put("w/late", "live")
                events.append(await watcher.next())
            got = [(e.kind, e.kv.key, e.kv.value, e.prev.value if e.prev else None) for e in events]
            assert got == [*expected, ("put", "w/late", b"live", None)]
            assert [e.revision for e in events][2:4] == [pair.revision] * 2
            assert events[0].revision == start and events[-1].revision == late
            assert all(a.revision <= b.revision for a, b in itertools.pairwise(events))

    run(scenario())


def test_watch_survives_killing_its_member(etcd3: EtcdCluster) -> None:
    async def scenario() -> None:
        async with Etcd(etcd3.endpoints) as etcd:
            start = await etcd.put("w/00", "0")
            async with watching(etcd, "w/", start) as watcher:
                assert (await watcher.next()).kv.key == "w/00"
                for i in range(1, 10):
                    await etcd.put(f"w/{i:02}", str(i))
                got = [await watcher.next() for _ in range(1, 10)]
                attached = etcd._preferred  # the member the watch (and the client) talk to
                etcd3.kill_member(name_at(etcd3, attached))
                for i in range(10, 20):
                    await etcd.put(f"w/{i:02}", str(i))
                assert etcd._preferred != attached
                got += [await watcher.next() for _ in range(10, 20)]
                sentinel = await etcd.put("w/zz", "end")
                last = await watcher.next()
            assert [e.kv.key for e in got] == [f"w/{i:02}" for i in range(1, 20)]  # none lost, none repeated
            assert (last.kv.key, last.revision) == ("w/zz", sentinel)

    run(scenario())


def test_watch_leaves_a_member_without_leader(etcd3: EtcdCluster) -> None:
    """A watch on a member cut off from the majority must not sit there silently."""

    async def scenario() -> None:
        async with Etcd(etcd3.endpoints, timeout=1.5, attempt_timeout=0.5) as etcd:
            start = await etcd.put("w/a", "1")
            async with watching(etcd, "w/", start) as watcher:
                assert (await watcher.next()).kv.key == "w/a"
                frozen = [m.name for i, m in enumerate(etcd3.members) if i != etcd._preferred]
                for name in frozen:
                    os.kill(etcd3.pid(name), signal.SIGSTOP)  # type: ignore[arg-type]
                try:
                    error = await watcher.ended(timeout=10)
                finally:
                    for name in frozen:
                        os.kill(etcd3.pid(name), signal.SIGCONT)  # type: ignore[arg-type]
            assert isinstance(error, EtcdUnavailable)

    run(scenario())


# --- fail-over -------------------------------------------------------------------------------------


def test_failover_when_the_client_member_dies(etcd3: EtcdCluster) -> None:
    async def scenario() -> None:
        async with Etcd(etcd3.endpoints, timeout=5) as etcd:
            await etcd.put("k", "1")
            used = etcd._preferred
            etcd3.kill_member(name_at(etcd3, used))
            began = time.monotonic()
            await etcd.put("k", "2")
            kv = await etcd.get("k")
            assert kv is not None and kv.value == b"2"
            assert time.monotonic() - began < etcd.timeout
            assert etcd._preferred != used

    run(scenario())


def test_failover_when_the_leader_dies(etcd3: EtcdCluster) -> None:
    async def scenario() -> None:
        async with Etcd(etcd3.endpoints, timeout=5) as etcd:
            old = etcd3.leader()
            assert old is not None
            lease, ttl = await etcd.lease_grant(1)
            await etcd.put("live/node1", "up", lease=lease)
            stop = asyncio.Event()

            async def keep_alive() -> None:
                while not stop.is_set():
                    assert await etcd.lease_keepalive(lease) > 0
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), ttl / 4)  # the keep-alive period

            keeper = asyncio.create_task(keep_alive())
            try:
                etcd3.kill_member(old)
                began = time.monotonic()
                for i in range(5):
                    await etcd.put(f"after/{i}", str(i))
                assert time.monotonic() - began < etcd.timeout
                new = await asyncio.to_thread(etcd3.leader)
                assert new is not None and new != old
                assert [kv.key for kv in await etcd.get_prefix("after/")] == [f"after/{i}" for i in range(5)]
                # the lease lived through the election (a new leader extends every lease)
                kv = await etcd.get("live/node1")
                assert kv is not None and kv.lease == lease
            finally:
                stop.set()
                await keeper
            assert await etcd.lease_keepalive(lease) == ttl
            assert await etcd.leader() == etcd3.spec(new).client_url

    run(scenario())


def test_unavailable_within_the_deadline(etcd3: EtcdCluster) -> None:
    async def scenario() -> None:
        async with Etcd(etcd3.endpoints, timeout=1, attempt_timeout=0.3) as etcd:
            await etcd.put("k", "1")
            # a single member without a majority must not answer, not even a read
            etcd3.kill_member("etcd1")
            etcd3.kill_member("etcd2")
            for call in (lambda: etcd.get("k"), lambda: etcd.put("k", "2")):
                began = time.monotonic()
                with pytest.raises(EtcdUnavailable):
                    await call()
                assert time.monotonic() - began < etcd.timeout + 1
            # every member dead: refused connections, still bounded by the deadline
            etcd3.kill_member("etcd3")
            began = time.monotonic()
            with pytest.raises(EtcdUnavailable, match="no member answered"):
                await etcd.get("k")
            assert time.monotonic() - began < etcd.timeout + 1
            began = time.monotonic()
            async with watching(etcd, "w/", 1) as watcher:
                assert isinstance(await watcher.ended(timeout=etcd.timeout + 1), EtcdUnavailable)

    run(scenario())


def test_bad_requests_are_errors_not_retries(etcd1: EtcdCluster) -> None:
    async def scenario() -> None:
        async with Etcd(etcd1.endpoints, timeout=5) as etcd:
            garbage = [("/v3/lease/keepalive", {"ID": "garbage"}), ("/v3/kv/txn", {"compare": "garbage"}),
                       ("/v3/kv/range", {"key": "not base64!"})]  # fmt: skip
            for path, body in garbage:
                began = time.monotonic()
                with pytest.raises(EtcdError) as caught:
                    await etcd.call(path, body)
                assert not isinstance(caught.value, EtcdUnavailable)
                assert time.monotonic() - began < 1  # answered at once, not retried until the deadline
            with pytest.raises(EtcdError, match="base64") as caught:
                await etcd.txn([{"key": "!!", "target": "VERSION", "result": "EQUAL", "version": "0"}], [])
            assert caught.value.code == 3  # INVALID_ARGUMENT
        with pytest.raises(ValueError):
            Etcd([])

    run(scenario())


# --- members ---------------------------------------------------------------------------------------


def test_killed_member_rejoins_with_its_data_dir(etcd3: EtcdCluster) -> None:
    async def scenario() -> None:
        async with Etcd(etcd3.endpoints) as etcd:
            await etcd.put("before", "1")
            old_pid = etcd3.pid("etcd2")
            etcd3.kill_member("etcd2")
            assert not etcd3.running("etcd2") and etcd3.pid("etcd2") is None
            for i in range(20):
                await etcd.put(f"during/{i:02}", str(i))
            await asyncio.to_thread(etcd3.start_member, "etcd2")
            assert etcd3.running("etcd2") and etcd3.pid("etcd2") not in (None, old_pid)
            async with Etcd([etcd3.spec("etcd2").client_url]) as only:
                assert (await only.get("before")).value == b"1"  # type: ignore[union-attr]
                assert len(await only.get_prefix("during/")) == 20
                assert sorted(m["name"] for m in await only.members()) == ["etcd1", "etcd2", "etcd3"]
                last = await etcd.put("after", "x")  # through another member
                assert (await only.get("after")).value == b"x"  # type: ignore[union-attr]
                status = await only.status(etcd3.spec("etcd2").client_url)
                assert int(status["header"]["revision"]) >= last

    run(scenario())


def test_whole_cluster_restarts_from_its_data_dirs(etcd3: EtcdCluster) -> None:
    async def write() -> int:
        async with Etcd(etcd3.endpoints) as etcd:
            return await etcd.put("kept", "across a restart")

    async def read() -> tuple[bytes, list[str]]:
        async with Etcd(etcd3.endpoints) as etcd:
            kv = await etcd.get("kept")
            assert kv is not None
            return kv.value, sorted(m["name"] for m in await etcd.members())

    revision = run(write())
    etcd3.stop()
    assert not any(etcd3.running(m.name) for m in etcd3.members)
    etcd3.start()  # "--initial-cluster-state new" again: ignored, the data dirs say who they are
    assert run(read()) == (b"across a restart", ["etcd1", "etcd2", "etcd3"])
    assert etcd3.leader() is not None
    assert revision == run(write()) - 1


def etcd_processes(data_dir: Path) -> list[int]:
    """Pids of processes whose command line mentions ``data_dir``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if str(data_dir).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def test_start_failure_reports_the_log_and_leaves_nothing(tmp_path: Path) -> None:
    ports = free_ports(4)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[2]))  # etcd2's client port
        taken.listen()
        cluster = make_etcd(tmp_path, 2, ports)
        began = time.monotonic()
        with pytest.raises(EtcdStartError, match=r"(?s)etcd2 exited.*address already in use"):
            cluster.start(timeout=10)
        assert time.monotonic() - began < 5  # it noticed the exit, it did not wait for the timeout
    assert not cluster.running("etcd1") and not cluster.running("etcd2")
    assert etcd_processes(tmp_path) == []
    cluster.stop()  # idempotent


def test_missing_binary_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcd_server, "ETCD_BINARY", "etcd-not-installed")
    cluster = make_etcd(tmp_path, 1)
    with pytest.raises(FileNotFoundError, match="etcd-server"):
        cluster.start()
    assert etcd_processes(tmp_path) == []
