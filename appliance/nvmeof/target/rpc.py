"""SPDK-compatible JSON-RPC 2.0 server on a Unix socket, over the soft target's configuration.

Kahu's orchestration (``appliance.spdk_rpc``) drives SPDK's ``nvmf_tgt`` through its JSON-RPC socket;
answering the same methods, with SPDK's parameter names, answer shapes, framing and error codes, lets
one code path (and SPDK's own Python client) configure both. Framing follows SPDK: JSON values written
back-to-back with no delimiter, parsed incrementally; each answer is one JSON value followed by "\\n";
a request bigger than SPDK's 256 KiB receive buffer, or bytes that are not JSON, get a parse error and
the connection is closed (the stream cannot be resynchronised); other connections are unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from .config import TRANSPORT_KEYS
from .config import _transport as validated_transport
from .model import Bdev, ConfigError, FileBdev, ListenAddress, MallocBdev, Subsystem
from .server import MAX_CNTLID, MIN_CNTLID, TargetServer

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
INVALID_STATE = -1

MAX_REQUEST = 256 * 1024  # SPDK's receive buffer per connection
MAX_CONNECTIONS = 64  # SPDK's limit; more connections are closed at once
VERSION = (26, 5, 0, "")
VERSION_STRING = "SPDK v26.05 (kahu soft target)"
NO_SUCH_DEVICE = "No such device"  # SPDK's strerror(ENODEV) for a missing bdev
TICK_RATE = 1_000_000_000  # bdev_get_iostat ticks are monotonic nanoseconds
KILL_SIGNALS = {
    "SIGINT": signal.SIGINT,
    "SIGTERM": signal.SIGTERM,
    "SIGQUIT": signal.SIGQUIT,
    "SIGHUP": signal.SIGHUP,
    "SIGKILL": signal.SIGKILL,
}
_TGT_NAME = {"tgt_name": str}  # every nvmf_* method takes it; the soft target has one target
_DEFAULT_TGT_NAME = "nvmf_tgt"


class RpcError(Exception):
    """A JSON-RPC error answer: ``code`` is one of SPDK's codes."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _ParseError(Exception):
    """The byte stream is not JSON or a request is too big; the connection cannot continue."""


# --- framing ----------------------------------------------------------------------------------------

_OUTSIDE_STRING = re.compile(rb'[{}\[\]"]')
_INSIDE_STRING = re.compile(rb'["\\]')
_WHITESPACE = b" \t\r\n"


class _Framer:
    """Cuts a byte stream into complete top-level JSON objects/arrays, resuming where it stopped.

    Only brackets and string quotes are tracked (UTF-8 continuation bytes never look like ASCII), so
    a request split over many reads is scanned once; the complete text is then parsed by ``json``.
    """

    def __init__(self, limit: int = MAX_REQUEST):
        self.limit = limit
        self.buf = bytearray()
        self._pos = 0  # next byte to scan
        self._depth = 0
        self._in_string = False

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next_frame(self) -> bytes | None:
        """The next complete JSON text, or None until more bytes arrive."""
        if self._depth == 0:
            start = len(self.buf) - len(self.buf.lstrip(_WHITESPACE))
            del self.buf[:start]
            if not self.buf:
                return None
            if self.buf[0] not in b"{[":
                raise _ParseError("request is not a JSON object or array")
            self._pos = 0
        while self._pos < len(self.buf):
            if self._in_string:
                m = _INSIDE_STRING.search(self.buf, self._pos)
                if m is None:
                    self._pos = len(self.buf)
                    break
                if m.group() == b"\\":
                    if m.end() >= len(self.buf):  # escaped byte not read yet
                        self._pos = m.start()
                        break
                    self._pos = m.end() + 1
                    continue
                self._in_string = False
                self._pos = m.end()
                continue
            m = _OUTSIDE_STRING.search(self.buf, self._pos)
            if m is None:
                self._pos = len(self.buf)
                break
            self._pos = m.end()
            char = m.group()
            if char == b'"':
                self._in_string = True
            elif char in b"{[":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    return self._take(self._pos)
        if len(self.buf) > self.limit:
            raise _ParseError(f"request larger than {self.limit} bytes")
        return None

    def _take(self, end: int) -> bytes:
        if end > self.limit:
            raise _ParseError(f"request larger than {self.limit} bytes")
        frame = bytes(self.buf[:end])
        del self.buf[:end]
        self._pos = 0
        return frame


# --- parameter decoding -----------------------------------------------------------------------------

ParamSpec = dict[str, type]


def _decode(params: dict[str, Any], required: ParamSpec, optional: ParamSpec | None = None) -> dict[str, Any]:
    """Check names and types like SPDK's object decoders: unknown, missing or mistyped -> -32602."""
    optional = optional or {}
    unknown = sorted(set(params) - set(required) - set(optional))
    if unknown:
        raise RpcError(INVALID_PARAMS, f"unknown parameter(s): {', '.join(unknown)}")
    missing = sorted(set(required) - set(params))
    if missing:
        raise RpcError(INVALID_PARAMS, f"missing required parameter(s): {', '.join(missing)}")
    for name, value in params.items():
        want = required.get(name) or optional[name]
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not (is_int if want is int else isinstance(value, want)):
            got = json.dumps(value)
            raise RpcError(INVALID_PARAMS, f"parameter {name} must be {_TYPE_NAMES[want]}, got {got}")
        if is_int and value < 0:
            raise RpcError(INVALID_PARAMS, f"parameter {name} must not be negative: {value}")
    if params.get("tgt_name", _DEFAULT_TGT_NAME) != _DEFAULT_TGT_NAME:
        raise RpcError(INVALID_PARAMS, f"Unable to find a target named {params['tgt_name']}")
    return params


_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object", list: "an array"}


def _listen_address(value: dict[str, Any]) -> ListenAddress:
    p = _decode(value, {"trtype": str, "traddr": str}, {"adrfam": str, "trsvcid": str})
    if p["trtype"].upper() != "TCP":
        raise RpcError(INVALID_PARAMS, f"trtype {p['trtype']} is not supported by the soft target (TCP only)")
    adrfam = {"ipv4": "IPv4", "ipv6": "IPv6"}.get(p.get("adrfam", "ipv4").lower())
    if adrfam is None:
        raise RpcError(INVALID_PARAMS, f"adrfam must be ipv4 or ipv6, got {p['adrfam']!r}")
    trsvcid = p.get("trsvcid")
    if trsvcid is None or not trsvcid.isdigit() or int(trsvcid) > 65535:
        raise RpcError(INVALID_PARAMS, f"trsvcid must be a port number string, got {trsvcid!r}")
    return ListenAddress(traddr=p["traddr"], trsvcid=str(int(trsvcid)), trtype="TCP", adrfam=adrfam)


# --- the server ---------------------------------------------------------------------------------------

Handler = Callable[["RpcServer", dict[str, Any]], Awaitable[Any]]
_METHODS: dict[str, Handler] = {}


def _rpc(fn: Handler) -> Handler:
    """Register a handler under its own name, which is the SPDK method name."""
    _METHODS[fn.__name__] = fn
    return fn


class RpcServer:
    """Serves SPDK's JSON-RPC on ``path`` for the target of ``server`` until ``stop()``."""

    def __init__(self, server: TargetServer, path: str):
        if not path:
            raise ValueError("RPC socket path must not be empty")
        self.server = server
        self.path = path
        self._listener: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._malloc_count = 0

    @property
    def target(self):
        return self.server.target

    async def start(self) -> None:
        _remove_stale_socket(self.path)
        self._listener = await asyncio.start_unix_server(self._serve, self.path)
        log.info("JSON-RPC listening on %s", self.path)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def __aenter__(self) -> RpcServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if len(self._connections) > MAX_CONNECTIONS:
                log.warning("JSON-RPC: more than %d connections, closing one", MAX_CONNECTIONS)
                return
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = _Framer()
        while data := await reader.read(65536):
            framer.feed(data)
            while True:
                try:
                    frame = framer.next_frame()
                    if frame is None:
                        break
                    request = json.loads(frame)
                except (_ParseError, ValueError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
                    log.warning("JSON-RPC parse error: %s", e)
                    await _send(writer, _error(None, PARSE_ERROR, f"Parse error: {e}"))
                    return
                answer = await self._answer(request)
                if answer is not None:
                    await _send(writer, answer)

    async def _answer(self, request: Any) -> Any:
        """The answer to one JSON value: an object, a batch array, or None (notifications only)."""
        if not isinstance(request, list):
            return await self._call(request)
        if not request:
            return _error(None, INVALID_REQUEST, "Invalid request: empty batch")
        answers = [await self._call(item) for item in request]
        return [a for a in answers if a is not None] or None

    async def _call(self, request: Any) -> dict[str, Any] | None:
        problem = _envelope_problem(request)
        if problem:
            rid = request.get("id") if isinstance(request, dict) and _valid_id(request.get("id")) else None
            return _error(rid, INVALID_REQUEST, f"Invalid request: {problem}")
        try:
            result = await self._dispatch(request["method"], request.get("params", {}))
        except RpcError as e:
            answer = _error(request.get("id"), e.code, e.message)
        else:
            answer = {"jsonrpc": "2.0", "id": request.get("id"), "result": result}
        return answer if "id" in request else None  # a notification gets no answer

    async def _dispatch(self, method: str, params: dict[str, Any] | list[Any]) -> Any:
        handler = _METHODS.get(method)
        if handler is None:
            raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method}")
        if isinstance(params, list):
            raise RpcError(INVALID_PARAMS, "Invalid parameters: params must be an object, not an array")
        try:
            return await handler(self, params)
        except RpcError:
            raise
        except ConfigError as e:
            raise RpcError(INVALID_PARAMS, str(e)) from e
        except Exception as e:
            log.exception("JSON-RPC %s failed", method)
            raise RpcError(INTERNAL_ERROR, f"Internal error: {e}") from e

    # --- framework ---------------------------------------------------------------------------------

    @_rpc
    async def spdk_get_version(self, params: dict[str, Any]) -> dict[str, Any]:
        _decode(params, {})
        major, minor, patch, suffix = VERSION
        return {
            "version": VERSION_STRING,
            "fields": {"major": major, "minor": minor, "patch": patch, "suffix": suffix},
        }

    @_rpc
    async def rpc_get_methods(self, params: dict[str, Any]) -> list[str]:
        p = _decode(params, {}, {"current": bool, "include_aliases": bool})
        names = sorted(_METHODS)
        if p.get("current"):
            names.remove("framework_start_init")  # only callable before init, and init is done
        return names

    @_rpc
    async def framework_wait_init(self, params: dict[str, Any]) -> bool:
        _decode(params, {})
        return True  # the soft target is initialised before its socket exists

    @_rpc
    async def framework_start_init(self, params: dict[str, Any]) -> bool:
        _decode(params, {})
        raise RpcError(INVALID_STATE, "Method may only be called before framework initialization")

    @_rpc
    async def spdk_kill_instance(self, params: dict[str, Any]) -> bool:
        p = _decode(params, {"sig_name": str})
        sig = KILL_SIGNALS.get(p["sig_name"].upper())
        if sig is None:
            raise RpcError(INVALID_PARAMS, f"sig_name must be one of {', '.join(KILL_SIGNALS)}")
        # Like SPDK: the process signals itself; answer first so the client sees the result.
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), sig)
        return True

    # --- nvmf --------------------------------------------------------------------------------------

    @_rpc
    async def nvmf_create_transport(self, params: dict[str, Any]) -> bool:
        p = _decode(params, {"trtype": str}, {**TRANSPORT_KEYS, **_TGT_NAME})
        p.pop("tgt_name", None)
        trtype = p.pop("trtype")
        if trtype.upper() == "RDMA":
            raise RpcError(INVALID_PARAMS, "RDMA transport is not supported by the soft target; use SPDK")
        transport = validated_transport(p)  # the YAML config's range checks, one set of rules
        transport.trtype = trtype
        self.target.add_transport(transport)
        return True

    @_rpc
    async def nvmf_get_transports(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        p = _decode(params, {}, {"trtype": str, **_TGT_NAME})
        transports = self.target.transports
        if "trtype" in p:
            key = p["trtype"].upper()
            if key not in transports:
                raise RpcError(INVALID_PARAMS, f"transport {p['trtype']} does not exist")
            return [asdict(transports[key])]
        return [asdict(t) for t in transports.values()]

    @_rpc
    async def nvmf_create_subsystem(self, params: dict[str, Any]) -> bool:
        p = _decode(
            params,
            {"nqn": str},
            {"serial_number": str, "model_number": str, "max_namespaces": int, "allow_any_host": bool,
             **_TGT_NAME},
        )
        p.pop("tgt_name", None)
        self.target.add_subsystem(Subsystem(**p))
        return True

    @_rpc
    async def nvmf_delete_subsystem(self, params: dict[str, Any]) -> bool:
        p = _decode(params, {"nqn": str}, _TGT_NAME)
        await self.target.delete_subsystem(p["nqn"])
        return True

    @_rpc
    async def nvmf_get_subsystems(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        p = _decode(params, {}, {"nqn": str, **_TGT_NAME})
        subs = [self.target.subsystem(p["nqn"])] if "nqn" in p else list(self.target.subsystems.values())
        return [self._subsystem_json(s) for s in subs]

    def _subsystem_json(self, sub: Subsystem) -> dict[str, Any]:
        out: dict[str, Any] = {
            "nqn": sub.nqn,
            "subtype": sub.subtype,
            "listen_addresses": [self._address_json(a) for a in sub.listeners],
            "allow_any_host": sub.allow_any_host,
            "hosts": [{"nqn": h} for h in sub.hosts],
        }
        if sub.is_discovery:
            return out
        out.update(
            serial_number=sub.serial_number,
            model_number=sub.model_number,
            max_namespaces=sub.max_namespaces,
            min_cntlid=MIN_CNTLID,
            max_cntlid=MAX_CNTLID,
            namespaces=[
                {
                    "nsid": ns.nsid,
                    "bdev_name": ns.bdev.name,
                    "name": ns.bdev.name,
                    "nguid": ns.nguid.hex().upper(),
                    "eui64": ns.eui64.hex().upper(),
                    "uuid": str(ns.uuid),
                }
                for ns in sorted(sub.namespaces.values(), key=lambda n: n.nsid)
            ],
        )
        return out

    def _address_json(self, address: ListenAddress) -> dict[str, str]:
        """The listener as SPDK shows it, with the port really bound when "0" asked for any port."""
        return {
            "trtype": address.trtype,
            "adrfam": address.adrfam,
            "traddr": address.traddr,
            "trsvcid": str(self.server.bound_port(address)),
        }

    @_rpc
    async def nvmf_subsystem_add_listener(self, params: dict[str, Any]) -> bool:
        nqn, address = self._listener_params(params)
        await self.target.add_listener(nqn, address)
        return True

    @_rpc
    async def nvmf_subsystem_remove_listener(self, params: dict[str, Any]) -> bool:
        nqn, address = self._listener_params(params)
        for known in self.target.subsystem(nqn).listeners:  # may be named by the port it really bound
            if known.traddr == address.traddr and str(self.server.bound_port(known)) == address.trsvcid:
                address = known
        await self.target.remove_listener(nqn, address)
        return True

    def _listener_params(self, params: dict[str, Any]) -> tuple[str, ListenAddress]:
        p = _decode(params, {"nqn": str, "listen_address": dict},
                    {"secure_channel": bool, **_TGT_NAME})
        if p.get("secure_channel"):
            raise RpcError(INVALID_PARAMS, "secure_channel (TLS) is not supported by the soft target")
        return p["nqn"], _listen_address(p["listen_address"])

    @_rpc
    async def nvmf_subsystem_add_ns(self, params: dict[str, Any]) -> int:
        p = _decode(params, {"nqn": str, "namespace": dict}, _TGT_NAME)
        ns = _decode(p["namespace"], {"bdev_name": str},
                     {"nsid": int, "nguid": str, "eui64": str, "uuid": str})
        return self.target.add_namespace(
            p["nqn"], ns["bdev_name"], nsid=ns.get("nsid"), nguid=ns.get("nguid"),
            eui64=ns.get("eui64"), uuid=ns.get("uuid"),
        )

    @_rpc
    async def nvmf_subsystem_remove_ns(self, params: dict[str, Any]) -> bool:
        p = _decode(params, {"nqn": str, "nsid": int}, _TGT_NAME)
        self.target.remove_namespace(p["nqn"], p["nsid"])
        return True

    @_rpc
    async def nvmf_subsystem_add_host(self, params: dict[str, Any]) -> bool:
        p = _decode(params, {"nqn": str, "host": str}, _TGT_NAME)
        self.target.add_host(p["nqn"], p["host"])
        return True

    @_rpc
    async def nvmf_subsystem_remove_host(self, params: dict[str, Any]) -> bool:
        p = _decode(params, {"nqn": str, "host": str}, _TGT_NAME)
        self.target.remove_host(p["nqn"], p["host"])
        return True

    @_rpc
    async def nvmf_subsystem_allow_any_host(self, params: dict[str, Any]) -> bool:
        p = _decode(params, {"nqn": str, "allow_any_host": bool}, _TGT_NAME)
        self.target.allow_any_host(p["nqn"], p["allow_any_host"])
        return True

    @_rpc
    async def nvmf_subsystem_get_controllers(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        p = _decode(params, {"nqn": str}, _TGT_NAME)
        sub = self.target.subsystem(p["nqn"])
        return [
            {"cntlid": c.cntlid, "cntrltype": "discovery" if sub.is_discovery else "io",
             "hostnqn": c.hostnqn, "num_io_qpairs": len(c.io_queues)}
            for c in sorted(self.server.controllers(sub), key=lambda c: c.cntlid)
        ]

    # --- bdevs -------------------------------------------------------------------------------------

    @_rpc
    async def bdev_malloc_create(self, params: dict[str, Any]) -> str:
        p = _decode(params, {"num_blocks": int, "block_size": int}, {"name": str, "uuid": str})
        name = p.get("name") or self._next_malloc_name()
        bdev = MallocBdev(name, p["block_size"], p["num_blocks"], p.get("uuid"))
        return self.target.add_bdev(bdev).name

    def _next_malloc_name(self) -> str:
        """SPDK numbers unnamed malloc bdevs with a counter: Malloc0, Malloc1, ..."""
        while True:
            name = f"Malloc{self._malloc_count}"
            self._malloc_count += 1
            if name not in self.target.bdevs:
                return name

    @_rpc
    async def bdev_malloc_delete(self, params: dict[str, Any]) -> bool:
        return self._delete_bdev(params, MallocBdev)

    @_rpc
    async def bdev_aio_create(self, params: dict[str, Any]) -> str:
        p = _decode(params, {"filename": str, "name": str}, {"block_size": int, "uuid": str})
        block_size = p.get("block_size") or 512  # 0 means "detect": regular files use 512
        if p["name"] in self.target.bdevs:
            raise RpcError(INVALID_PARAMS, f"bdev {p['name']} already exists")
        bdev = FileBdev(p["name"], p["filename"], block_size, p.get("uuid"))
        return self.target.add_bdev(bdev).name

    @_rpc
    async def bdev_aio_delete(self, params: dict[str, Any]) -> bool:
        return self._delete_bdev(params, FileBdev)

    def _delete_bdev(self, params: dict[str, Any], kind: type[Bdev]) -> bool:
        p = _decode(params, {"name": str})
        if not isinstance(self.target.bdevs.get(p["name"]), kind):
            raise RpcError(INVALID_PARAMS, NO_SUCH_DEVICE)
        self.target.delete_bdev(p["name"])
        return True

    @_rpc
    async def bdev_get_bdevs(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        p = _decode(params, {}, {"name": str, "timeout": int})
        return [_bdev_json(b) for b in self._bdevs(p.get("name"))]

    @_rpc
    async def bdev_get_iostat(self, params: dict[str, Any]) -> dict[str, Any]:
        p = _decode(params, {}, {"name": str})
        return {
            "tick_rate": TICK_RATE,
            "ticks": time.monotonic_ns(),
            "bdevs": [{"name": b.name, **asdict(b.stat), "read_latency_ticks": 0, "write_latency_ticks": 0,
                       "unmap_latency_ticks": 0, "queue_depth": 0, "io_time": 0, "weighted_io_time": 0}
                      for b in self._bdevs(p.get("name"))],
        }

    def _bdevs(self, name: str | None) -> list[Bdev]:
        if name is None:
            return list(self.target.bdevs.values())
        bdev = self.target.bdevs.get(name)
        if bdev is None:
            raise RpcError(INVALID_PARAMS, NO_SUCH_DEVICE)
        return [bdev]


def _bdev_json(bdev: Bdev) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": bdev.name,
        "aliases": [],
        "product_name": bdev.product_name,
        "block_size": bdev.block_size,
        "num_blocks": bdev.num_blocks,
        "uuid": bdev.uuid,
        "assigned_rate_limits": {"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0,
                                 "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0},
        "claimed": bdev.claimed,
        "zoned": False,
        "supported_io_types": {
            "read": True, "write": True, "unmap": True, "write_zeroes": True, "flush": True,
            "reset": True, "compare": False, "compare_and_write": False, "abort": False,
            "nvme_admin": False, "nvme_io": False,
        },
        "driver_specific": {},
    }
    if bdev.claimed:
        out["claim_type"] = "exclusive_write"
    if isinstance(bdev, FileBdev):
        out["driver_specific"] = {"aio": {"filename": bdev.filename, "block_size_override": True,
                                          "readonly": False, "fallocate": False}}
    return out


def _valid_id(rid: Any) -> bool:
    return rid is None or (isinstance(rid, str | int | float) and not isinstance(rid, bool))


def _envelope_problem(request: Any) -> str | None:
    """Why ``request`` is not a JSON-RPC 2.0 request object, or None when it is one."""
    if not isinstance(request, dict):
        return "not an object"
    if request.get("jsonrpc") != "2.0":
        return 'jsonrpc must be "2.0"'
    if not isinstance(request.get("method"), str):
        return "method must be a string"
    if not isinstance(request.get("params", {}), dict | list):
        return "params must be an object"
    if not _valid_id(request.get("id")):
        return "id must be a string, a number or null"
    extra = set(request) - {"jsonrpc", "method", "params", "id"}
    if extra:
        return f"unknown member(s) {', '.join(sorted(extra))}"
    return None


def _error(rid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}


async def _send(writer: asyncio.StreamWriter, answer: Any) -> None:
    writer.write(json.dumps(answer).encode() + b"\n")
    await writer.drain()


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead process; refuse to steal one that still answers."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"RPC socket path {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise ConfigError(f"RPC socket {path} is in use by another process")
    finally:
        probe.close()

