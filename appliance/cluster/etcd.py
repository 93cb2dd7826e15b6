"""An asyncio etcd v3 client over etcd's JSON gateway (``/v3/...``), with fail-over between members.

The gRPC client libraries for etcd lag behind protobuf; the gateway is part of every etcd server and
speaks plain JSON, so one small HTTP client (aiohttp, C-accelerated) covers what Kahu needs: ranges,
puts, deletes, transactions, leases and watches. Keys are text (Kahu's keys are paths); values are
bytes. Every call has a deadline; within it a call moves on to the next member when one is dead,
cut off or without a leader, so losing the member it talks to (even the leader) costs a retry, not an
error. Reads are linearizable: a member cut off from the majority cannot answer with stale state.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

DEFAULT_TIMEOUT = 5.0  # a whole call, across fail-overs
ATTEMPT_TIMEOUT = 1.0  # one member; a member without a leader holds a request this long at most
WATCH_SILENCE = 3.0  # a watch stream quiet this long is dead: Kahu's members notify progress every second
# gRPC status codes (in the gateway's error body) that mean "ask another member".
_RETRY_CODES = {4, 14}  # DEADLINE_EXCEEDED, UNAVAILABLE
_RETRY_MESSAGES = ("leader changed", "no leader", "request timed out", "not capable", "too many requests")


class EtcdError(Exception):
    """etcd refused a request (bad request, lease not found, compacted revision...)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No member answered within the call's deadline."""


class WatchCompacted(EtcdError):
    """A watch asked for history that etcd has compacted away; re-read the state and watch again."""


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with ``prefix`` (etcd's ``--prefix``)."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return _b64(bytes(raw))
        raw.pop()
    return _b64(b"\0")  # the empty prefix: every key


def _prefix_range(prefix: str) -> dict[str, str]:
    """``key`` and ``range_end`` selecting ``prefix``; etcd refuses an empty key, so "" starts at \\0."""
    return {"key": _b64(prefix or "\0"), "range_end": prefix_end(prefix)}


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0

    @classmethod
    def from_json(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(
            key=_unb64(kv.get("key")).decode(),
            value=_unb64(kv.get("value")),
            create_revision=int(kv.get("create_revision", 0)),
            mod_revision=int(kv.get("mod_revision", 0)),
            version=int(kv.get("version", 0)),
            lease=int(kv.get("lease", 0)),
        )

    def json(self) -> Any:
        return json.loads(self.value)


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "put" or "delete"
    kv: KeyValue  # for a delete: the key and revision only
    prev: KeyValue | None
    revision: int


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: list[dict[str, Any]]

    def ranges(self) -> list[list[KeyValue]]:
        """The key-values of each range operation in the branch that ran, in order."""
        return [[KeyValue.from_json(kv) for kv in r["response_range"].get("kvs", [])]
                for r in self.responses if "response_range" in r]


# --- transaction building blocks --------------------------------------------------------------------

_OPS = {"==": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}


def _compare(key: str, target: str, op: str, field: str, value: Any) -> dict[str, Any]:
    return {"key": _b64(key), "target": target, "result": _OPS[op], field: value}


def version_is(key: str, version: int, op: str = "==") -> dict[str, Any]:
    """Compare a key's version; ``version_is(k, 0)`` means "k does not exist"."""
    return _compare(key, "VERSION", op, "version", str(version))


def mod_revision_is(key: str, revision: int, op: str = "==") -> dict[str, Any]:
    """Compare a key's last-modified revision: "nobody changed it since I read it"."""
    return _compare(key, "MOD", op, "mod_revision", str(revision))


def value_is(key: str, value: bytes | str, op: str = "==") -> dict[str, Any]:
    return _compare(key, "VALUE", op, "value", _b64(value))


def put_op(key: str, value: bytes | str, lease: int = 0) -> dict[str, Any]:
    request: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        request["lease"] = str(lease)
    return {"request_put": request}


def delete_op(key: str, prefix: bool = False) -> dict[str, Any]:
    return {"request_delete_range": _prefix_range(key) if prefix else {"key": _b64(key)}}


def range_op(key: str, prefix: bool = False) -> dict[str, Any]:
    return {"request_range": _prefix_range(key) if prefix else {"key": _b64(key)}}


# --- the client -------------------------------------------------------------------------------------


class Etcd:
    """A connection pool to an etcd cluster; use as ``async with Etcd([url, ...]) as etcd:``."""

    def __init__(self, endpoints: Sequence[str], timeout: float = DEFAULT_TIMEOUT,
                 attempt_timeout: float = ATTEMPT_TIMEOUT, watch_silence: float = WATCH_SILENCE):
        if not endpoints:
            raise ValueError("etcd endpoints: at least one URL is needed")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self.watch_silence = watch_silence
        self._preferred = 0  # the member that answered last
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Etcd:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=64, force_close=False)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    # --- plumbing --------------------------------------------------------------------------------

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._preferred + i) % n for i in range(n)]

    async def call(self, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """POST ``body`` to ``path`` on a live member; fail over until the deadline."""
        deadline = time.monotonic() + (timeout or self.timeout)
        problems: list[str] = []
        while True:
            for index in self._order():
                left = deadline - time.monotonic()
                if left <= 0:
                    tried = "; ".join(problems[-len(self.endpoints):])
                    raise EtcdUnavailable(f"etcd {path}: no member answered ({tried})")
                endpoint = self.endpoints[index]
                try:
                    answer = await self._post(endpoint, path, body, min(left, self.attempt_timeout))
                except _Retry as e:
                    problems.append(f"{endpoint}: {e}")
                    continue
                self._preferred = index
                return answer
            # every member failed once: pause briefly (an election takes ~1 s) before the next round
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    async def _post(self, endpoint: str, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        try:
            async with asyncio.timeout(timeout):
                async with self.session.post(endpoint + path, json=body) as response:
                    answer = await response.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, json.JSONDecodeError) as e:
            raise _Retry(str(e) or type(e).__name__) from e
        if not isinstance(answer, dict):
            raise _Retry(f"unexpected answer {answer!r:.80}")
        error = _error_of(answer, response.status)
        if error is not None:
            message, code = error
            if code in _RETRY_CODES or any(m in message for m in _RETRY_MESSAGES):
                raise _Retry(message)
            raise EtcdError(f"etcd {path}: {message}", code)
        return answer

    # --- key-value ---------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        answer = await self.call("/v3/kv/range", {"key": _b64(key)})
        kvs = answer.get("kvs") or []
        return KeyValue.from_json(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str, limit: int = 0, newest_first: bool = False) -> list[KeyValue]:
        """Keys under ``prefix`` in key order (``newest_first``: descending), at most ``limit`` (0: all)."""
        if not limit and not newest_first:
            kvs, _ = await self.get_prefix_at(prefix)
            return kvs
        body: dict[str, Any] = {**_prefix_range(prefix), "limit": str(limit)}
        if newest_first:
            body |= {"sort_order": "DESCEND", "sort_target": "KEY"}
        answer = await self.call("/v3/kv/range", body)
        return [KeyValue.from_json(kv) for kv in answer.get("kvs") or []]

    async def revision(self) -> int:
        """The store's current revision (to watch from revision+1), without reading any key."""
        answer = await self.call("/v3/kv/range", {"key": _b64("\0"), "count_only": True})
        return int(answer["header"]["revision"])

    async def count(self, prefix: str) -> int:
        """How many keys are under ``prefix`` (counted by etcd; no values travel)."""
        answer = await self.call("/v3/kv/range", {**_prefix_range(prefix), "count_only": True})
        return int(answer.get("count", 0))

    async def delete_until(self, prefix: str, last: str) -> int:
        """Delete the keys under ``prefix`` up to and including ``last``; returns how many."""
        body = {"key": _b64(prefix or "\0"), "range_end": _b64(last.encode() + b"\0")}
        answer = await self.call("/v3/kv/deleterange", body)
        return int(answer.get("deleted", 0))

    async def get_prefix_at(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` and the revision they were read at (to watch from revision+1)."""
        answer = await self.call("/v3/kv/range", _prefix_range(prefix))
        kvs = [KeyValue.from_json(kv) for kv in answer.get("kvs") or []]
        return kvs, int(answer["header"]["revision"])

    async def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        """Write a key; returns the revision of the write."""
        answer = await self.call("/v3/kv/put", put_op(key, value, lease)["request_put"])
        return int(answer["header"]["revision"])

    async def delete(self, key: str, prefix: bool = False) -> int:
        """Delete a key (or every key under a prefix); returns how many were deleted."""
        answer = await self.call("/v3/kv/deleterange", delete_op(key, prefix)["request_delete_range"])
        return int(answer.get("deleted", 0))

    async def txn(self, compare: Sequence[dict[str, Any]], success: Sequence[dict[str, Any]],
                  failure: Sequence[dict[str, Any]] = ()) -> TxnResult:
        """If every comparison holds, run ``success``, else ``failure``, atomically."""
        body = {"compare": list(compare), "success": list(success), "failure": list(failure)}
        answer = await self.call("/v3/kv/txn", body)
        return TxnResult(bool(answer.get("succeeded", False)), int(answer["header"]["revision"]),
                         answer.get("responses") or [])

    # --- leases ------------------------------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> tuple[int, int]:
        """A new lease; returns (id, ttl) — etcd may raise a short TTL to its minimum."""
        answer = await self.call("/v3/lease/grant", {"TTL": str(ttl)})
        if answer.get("error"):
            raise EtcdError(f"lease grant: {answer['error']}")
        return int(answer["ID"]), int(answer["TTL"])

    async def lease_keepalive(self, lease: int) -> int:
        """Refresh a lease; returns its new TTL, 0 when the lease no longer exists."""
        answer = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    async def lease_revoke(self, lease: int) -> None:
        """End a lease now, deleting the keys attached to it; a lease already gone is not an error."""
        try:
            await self.call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as e:
            if "lease not found" not in str(e):
                raise

    # --- watches -----------------------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Changes under ``prefix`` from ``start_revision`` on, for as long as the caller iterates.

        A watch survives losing its member: it reconnects to the next one and resumes after the
        last revision it delivered, so no change is skipped or repeated. A member that loses its
        leader ends the stream (etcd's require-leader option), so a watch never sits silently on a
        member cut off from the cluster. Raises ``WatchCompacted`` when the history it needs is
        gone, ``EtcdUnavailable`` when no member serves it for the call timeout.
        """
        next_revision = start_revision
        down_since: float | None = None
        while True:
            endpoint = self.endpoints[self._preferred]
            request = {"create_request": {**_prefix_range(prefix), "start_revision": str(next_revision),
                                          "prev_kv": True, "progress_notify": True}}
            resume = next_revision
            try:
                async for event in self._watch_stream(endpoint, request):
                    down_since = None  # this member serves the watch
                    # One revision can hold several events (a transaction): compare with where this
                    # stream started, not with the last event, or all but the first would be lost.
                    if event is not None and event.revision >= resume:
                        next_revision = event.revision + 1
                        yield event
            except _Retry:
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > self.timeout:
                    raise EtcdUnavailable(f"etcd watch {prefix}: no member answered") from None
                self._preferred = (self._preferred + 1) % len(self.endpoints)
                await asyncio.sleep(0.05)  # back off a little between members, not synchronisation

    async def next_change(self, prefix: str, start_revision: int) -> WatchEvent:
        """The first change under ``prefix`` from ``start_revision`` on (the stream is closed after)."""
        async with contextlib.aclosing(self.watch(prefix, start_revision)) as events:
            async for event in events:
                return event
        raise EtcdError(f"watch {prefix} ended")  # not reached: a watch ends only by raising

    async def _watch_stream(self, endpoint: str, request: dict[str, Any]) -> AsyncIterator[WatchEvent | None]:
        """One watch stream on one member: its events, and None for a message without any.

        The member must confirm the watch within the attempt timeout (a frozen or unreachable one
        would otherwise hold it forever), and then say something at least every ``watch_silence``.
        """
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.attempt_timeout, sock_read=None)
        try:
            async with contextlib.AsyncExitStack() as stack:
                async with asyncio.timeout(self.attempt_timeout):
                    response = await stack.enter_async_context(self.session.post(
                        endpoint + "/v3/watch", json=request, timeout=timeout, headers=_REQUIRE_LEADER))
                    if response.status != 200:
                        raise _Retry(f"watch: HTTP {response.status}")
                    messages = _json_lines(response.content)
                    stack.push_async_callback(messages.aclose)
                    created = await anext(messages)
                for event in _watch_events(created) or [None]:
                    yield event
                while True:
                    # Members send progress notifications (see etcd_server.PROGRESS_NOTIFY), so a
                    # silent stream means a member we cannot reach any more: a cut link drops
                    # its "no leader" cancellation too, and the stream would hang forever.
                    try:
                        async with asyncio.timeout(self.watch_silence):
                            message = await anext(messages)
                    except StopAsyncIteration:
                        return
                    for event in _watch_events(message) or [None]:
                        yield event
        except (aiohttp.ClientError, OSError, TimeoutError, json.JSONDecodeError) as e:
            raise _Retry(str(e) or type(e).__name__) from e

    # --- cluster -----------------------------------------------------------------------------------

    async def status(self, endpoint: str) -> dict[str, Any]:
        """One member's status (its id, the leader's id, raft term), asked of that member only."""
        try:
            return await self._post(endpoint.rstrip("/"), "/v3/maintenance/status", {}, self.attempt_timeout)
        except _Retry as e:
            raise EtcdUnavailable(f"etcd {endpoint}: {e}") from None

    async def members(self) -> list[dict[str, Any]]:
        answer = await self.call("/v3/cluster/member/list", {})
        return answer.get("members") or []

    async def leader(self) -> str | None:
        """The client URL of the member that is leader now, as the live members see it."""
        members = {int(m["ID"]): m for m in await self.members()}
        for endpoint in self.endpoints:
            with contextlib.suppress(EtcdError):
                status = await self.status(endpoint)
                leader = members.get(int(status.get("leader", 0)))
                if leader and leader.get("clientURLs"):
                    return leader["clientURLs"][0]
        return None


class _Retry(Exception):
    """This member could not answer; another may."""


# gRPC metadata through the gateway: a member without a leader refuses, and later cancels, the stream.
_REQUIRE_LEADER = {"Grpc-Metadata-Hasleader": "true"}


def _error_of(answer: dict[str, Any], status: int) -> tuple[str, int | None] | None:
    """The gateway's error: flat (a failed unary call) or nested (a stream's), None when it succeeded."""
    error = answer.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error), error.get("grpc_code")
    if status == 200:
        return None  # a LeaseGrantResponse has a string "error" field of its own
    return str(answer.get("message") or error or f"HTTP {status}"), answer.get("code")


async def _json_lines(stream: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """Newline-delimited JSON messages of any size (aiohttp's readline refuses lines over 512 KiB,
    and one watch response can carry a thousand revisions of large values)."""
    buffer = bytearray()
    while True:
        chunk = await stream.readany()
        if not chunk:
            raise _Retry("watch stream ended")
        searched = len(buffer)
        buffer += chunk
        while (end := buffer.find(b"\n", searched)) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            searched = 0
            if line.strip():
                message = json.loads(line)
                if isinstance(message, dict):
                    yield message


def _watch_events(message: dict[str, Any]) -> list[WatchEvent]:
    """The events in one watch response; errors, cancellations and compaction as exceptions."""
    if "error" in message:
        error = message["error"]
        raise _Retry(str(error.get("message", error) if isinstance(error, dict) else error))
    result = message.get("result", {})
    if int(result.get("compact_revision", 0)):
        raise WatchCompacted(f"watch: revision compacted at {result['compact_revision']}")
    if result.get("canceled"):
        raise EtcdError(f"watch canceled: {result.get('cancel_reason', 'no reason')}")
    events = []
    for raw in result.get("events") or []:
        kv = KeyValue.from_json(raw["kv"])
        prev = KeyValue.from_json(raw["prev_kv"]) if raw.get("prev_kv") else None
        kind = "delete" if raw.get("type") == "DELETE" else "put"
        events.append(WatchEvent(kind, kv, prev, kv.mod_revision))
    return events
