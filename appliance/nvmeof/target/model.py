"""The soft target's configuration: bdevs, transports, subsystems, namespaces, listeners, hosts.

This is the state SPDK's JSON-RPC methods and the YAML config both edit. It is plain data plus the
checks SPDK makes; the protocol engine (``server.TargetServer``) implements :class:`Engine` to
react to changes: open and close listening sockets, send namespace-change events, drop
controllers of a deleted subsystem or of a host that lost access.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Protocol

from ..spec import DISCOVERY_NQN, NQN_MAX


class ConfigError(ValueError):
    """A request that does not fit the current configuration (SPDK answers -32602)."""


def parse_uuid(text: str) -> uuidlib.UUID:
    """A UUID from configuration or an RPC; a malformed one is a ConfigError, not a crash."""
    try:
        return uuidlib.UUID(text)
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"not a UUID: {text!r}") from e


@dataclass(frozen=True, slots=True)
class ListenAddress:
    traddr: str
    trsvcid: str
    trtype: str = "TCP"
    adrfam: str = "IPv4"

    @property
    def port(self) -> int:
        return int(self.trsvcid)


@dataclass(slots=True)
class IoStat:
    bytes_read: int = 0
    num_read_ops: int = 0
    bytes_written: int = 0
    num_write_ops: int = 0
    bytes_unmapped: int = 0
    num_unmap_ops: int = 0


class Bdev:
    """A block device a namespace exports. Offsets and lengths are in bytes."""

    product_name = "Bdev"
    blocking = False  # True when I/O may block and must run off the event loop

    def __init__(self, name: str, block_size: int, num_blocks: int, uuid: str | None = None):
        if block_size < 512 or block_size % 512:
            raise ConfigError(f"block_size {block_size} is not a multiple of 512")
        if num_blocks <= 0:
            raise ConfigError(f"num_blocks {num_blocks} must be positive")
        self.name = name
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.uuid = str(parse_uuid(uuid)) if uuid else str(uuidlib.uuid4())
        self.claimed = False
        self.stat = IoStat()

    @property
    def size(self) -> int:
        return self.block_size * self.num_blocks

    def readinto(self, offset: int, buf: memoryview) -> None:
        raise NotImplementedError

    def view(self, offset: int, length: int) -> memoryview | None:
        """The data in place, when the bdev holds it in memory; None when it must be read."""
        return None

    def readinto_nowait(self, offset: int, buf: memoryview) -> bool:
        """``readinto`` if that cannot block; False (nothing read) if it might."""
        if self.blocking:
            return False
        self.readinto(offset, buf)
        return True

    def write(self, offset: int, data: memoryview | bytes) -> None:
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def deallocate(self, offset: int, length: int) -> None:
        """Discard a range; it reads back as zeroes afterwards (DLFEAT = 1)."""
        self.write_zeroes(offset, length)

    def flush(self) -> None:
        """Make completed writes durable."""

    def close(self) -> None:
        """Release the backing store."""


class MallocBdev(Bdev):
    """RAM-backed, like SPDK's malloc bdev: never blocks, so it is served on the event loop."""

    product_name = "Malloc disk"

    def __init__(self, name: str, block_size: int, num_blocks: int, uuid: str | None = None):
        super().__init__(name, block_size, num_blocks, uuid)
        self._mem = mmap.mmap(-1, self.size)
        self._view = memoryview(self._mem)

    def readinto(self, offset: int, buf: memoryview) -> None:
        buf[:] = self._view[offset : offset + len(buf)]

    def view(self, offset: int, length: int) -> memoryview:
        """Zero-copy reads: the next write to these blocks changes what the view shows."""
        return self._view[offset : offset + length]

    def write(self, offset: int, data: memoryview | bytes) -> None:
        self._view[offset : offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int) -> None:
        self._view[offset : offset + length] = bytes(length)

    def close(self) -> None:
        self._view.release()
        self._mem.close()


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class FileBdev(Bdev):
    """A file or block device read and written with ``preadv``/``pwritev`` (SPDK's aio bdev)."""

    product_name = "AIO disk"
    blocking = True

    def __init__(self, name: str, filename: str, block_size: int = 512, uuid: str | None = None):
        try:
            fd = os.open(filename, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"cannot open {filename}: {e.strerror}") from e
        try:  # any refusal below must not leak the descriptor
            size = os.lseek(fd, 0, os.SEEK_END)
            if size < block_size:
                raise ConfigError(f"{filename} is smaller than one {block_size}-byte block")
            super().__init__(name, block_size, size // block_size, uuid)
        except BaseException:
            os.close(fd)
            raise
        self.filename = filename
        self.fd = fd
        self._nowait = True  # RWF_NOWAIT reads work here until the kernel says otherwise

    def readinto(self, offset: int, buf: memoryview) -> None:
        done = os.preadv(self.fd, [buf], offset)
        if done < len(buf):  # past end of a sparse/short file: zeroes
            buf[done:] = bytes(len(buf) - done)

    def readinto_nowait(self, offset: int, buf: memoryview) -> bool:
        """Read data the page cache holds (RWF_NOWAIT), sparing the thread hand-off; else False."""
        if not self._nowait:
            return False
        try:
            return os.preadv(self.fd, [buf], offset, os.RWF_NOWAIT) == len(buf)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            self._nowait = False
            return False

    def write(self, offset: int, data: memoryview | bytes) -> None:
        view = memoryview(data)
        while view:
            done = os.pwritev(self.fd, [view], offset)
            view, offset = view[done:], offset + done

    def write_zeroes(self, offset: int, length: int) -> None:
        chunk = bytes(min(length, 1 << 20))
        while length:
            n = min(length, len(chunk))
            self.write(offset, memoryview(chunk)[:n])
            offset, length = offset + n, length - n

    def deallocate(self, offset: int, length: int) -> None:
        try:
            _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                raise
            self.write_zeroes(offset, length)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


@functools.cache
def _libc_fallocate():
    """libc's fallocate(2), loaded once: a DSM deallocate may call it for every range."""
    import ctypes

    fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    return fallocate


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes

    if _libc_fallocate()(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(slots=True)
class Namespace:
    nsid: int
    bdev: Bdev
    nguid: bytes  # 16 bytes
    eui64: bytes  # 8 bytes
    uuid: uuidlib.UUID


@dataclass(slots=True)
class Transport:
    """Options of ``nvmf_create_transport`` with SPDK's TCP defaults."""

    trtype: str = "TCP"
    max_queue_depth: int = 128
    max_io_qpairs_per_ctrlr: int = 127
    in_capsule_data_size: int = 4096
    max_io_size: int = 131072
    io_unit_size: int = 131072
    max_aq_depth: int = 128
    num_shared_buffers: int = 511
    buf_cache_size: int = 32
    dif_insert_or_strip: bool = False
    zcopy: bool = False
    abort_timeout_sec: int = 1
    c2h_success: bool = True
    sock_priority: int = 0
    kas: int = 100
    min_kato: int = 10000


def check_nqn(nqn: str) -> None:
    if not nqn or len(nqn.encode()) > NQN_MAX:
        raise ConfigError(f"NQN must be 1..{NQN_MAX} bytes: {nqn!r}")
    if not (nqn.startswith("nqn.") or nqn == DISCOVERY_NQN):
        raise ConfigError(f"NQN must start with 'nqn.': {nqn!r}")


@dataclass(slots=True)
class Subsystem:
    nqn: str
    serial_number: str = "00000000000000000000"
    model_number: str = "SPDK bdev Controller"
    max_namespaces: int = 32
    allow_any_host: bool = False
    subtype: str = "NVMe"
    hosts: list[str] = field(default_factory=list)
    namespaces: dict[int, Namespace] = field(default_factory=dict)
    listeners: list[ListenAddress] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_nqn(self.nqn)
        if len(self.serial_number) > 20 or not self.serial_number.isascii():
            raise ConfigError(f"serial_number must be at most 20 ASCII characters: {self.serial_number!r}")
        if len(self.model_number) > 40 or not self.model_number.isascii():
            raise ConfigError(f"model_number must be at most 40 ASCII characters: {self.model_number!r}")
        if not 1 <= self.max_namespaces <= 1024:
            raise ConfigError(f"max_namespaces must be 1..1024: {self.max_namespaces}")

    @property
    def is_discovery(self) -> bool:
        return self.subtype == "Discovery"

    def host_allowed(self, hostnqn: str) -> bool:
        return self.is_discovery or self.allow_any_host or hostnqn in self.hosts

    def add_namespace(
        self,
        bdev: Bdev,
        nsid: int | None = None,
        nguid: str | None = None,
        eui64: str | None = None,
        uuid: str | None = None,
    ) -> Namespace:
        if bdev.claimed:
            raise ConfigError(f"bdev {bdev.name} is already claimed")
        if nsid is None or nsid == 0:
            free = [n for n in range(1, self.max_namespaces + 1) if n not in self.namespaces]
            if not free:
                raise ConfigError(f"subsystem {self.nqn} has no free namespace ID")
            nsid = free[0]
        if not 1 <= nsid <= self.max_namespaces:
            raise ConfigError(f"nsid {nsid} outside 1..{self.max_namespaces}")
        if nsid in self.namespaces:
            raise ConfigError(f"nsid {nsid} already in use in {self.nqn}")
        ns_uuid = parse_uuid(uuid or bdev.uuid)
        try:
            nguid_b = bytes.fromhex(nguid.replace("-", "")) if nguid else ns_uuid.bytes
            eui64_b = bytes.fromhex(eui64.replace("-", "")) if eui64 else ns_uuid.bytes[:8]
        except ValueError as e:
            raise ConfigError(f"bad nguid/eui64: {e}") from e
        if len(nguid_b) != 16 or len(eui64_b) != 8:
            raise ConfigError("nguid must be 16 bytes and eui64 8 bytes")
        ns = Namespace(nsid, bdev, nguid_b, eui64_b, ns_uuid)
        bdev.claimed = True
        self.namespaces[nsid] = ns
        return ns

    def remove_namespace(self, nsid: int) -> Namespace:
        ns = self.namespaces.pop(nsid, None)
        if ns is None:
            raise ConfigError(f"subsystem {self.nqn} has no namespace {nsid}")
        ns.bdev.claimed = False
        return ns


class Engine(Protocol):
    """What the protocol engine does when the configuration changes."""

    async def listen(self, address: ListenAddress) -> None: ...

    async def unlisten(self, address: ListenAddress) -> None: ...

    def namespaces_changed(self, subsystem: Subsystem, nsids: list[int]) -> None: ...

    def access_changed(self, subsystem: Subsystem) -> None: ...

    def subsystem_deleted(self, subsystem: Subsystem) -> None: ...

    def discovery_changed(self) -> None: ...


class Target:
    """All configuration of one target process; every mutation tells the engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.transports: dict[str, Transport] = {}
        self.bdevs: dict[str, Bdev] = {}
        self.subsystems: dict[str, Subsystem] = {
            DISCOVERY_NQN: Subsystem(DISCOVERY_NQN, subtype="Discovery", allow_any_host=True)
        }
        self._listen_refs: dict[tuple[str, str], int] = {}

    # bdevs
    def add_bdev(self, bdev: Bdev) -> Bdev:
        if bdev.name in self.bdevs:
            bdev.close()
            raise ConfigError(f"bdev {bdev.name} already exists")
        self.bdevs[bdev.name] = bdev
        return bdev

    def delete_bdev(self, name: str) -> None:
        bdev = self.bdevs.get(name)
        if bdev is None:
            raise ConfigError(f"no bdev named {name}")
        if bdev.claimed:
            raise ConfigError(f"bdev {name} is claimed by a subsystem; remove the namespace first")
        del self.bdevs[name]
        bdev.close()

    # transports
    def add_transport(self, transport: Transport) -> None:
        key = transport.trtype.upper()
        if key != "TCP":
            raise ConfigError(f"transport {transport.trtype} is not supported by the soft target")
        if key in self.transports:
            raise ConfigError(f"transport {key} already exists")
        transport.trtype = key
        self.transports[key] = transport

    @property
    def tcp(self) -> Transport:
        """The TCP transport's options (SPDK defaults until one is created)."""
        return self.transports.get("TCP") or Transport()

    # subsystems
    def subsystem(self, nqn: str) -> Subsystem:
        if nqn == "discovery":
            nqn = DISCOVERY_NQN
        sub = self.subsystems.get(nqn)
        if sub is None:
            raise ConfigError(f"subsystem {nqn} does not exist")
        return sub

    def add_subsystem(self, sub: Subsystem) -> None:
        if sub.nqn in self.subsystems:
            raise ConfigError(f"subsystem {sub.nqn} already exists")
        self.subsystems[sub.nqn] = sub
        self.engine.discovery_changed()

    async def delete_subsystem(self, nqn: str) -> None:
        sub = self.subsystem(nqn)
        if sub.is_discovery:
            raise ConfigError("the discovery subsystem cannot be deleted")
        for address in list(sub.listeners):
            await self.remove_listener(nqn, address)
        for nsid in list(sub.namespaces):
            sub.remove_namespace(nsid)
        del self.subsystems[sub.nqn]
        self.engine.subsystem_deleted(sub)
        self.engine.discovery_changed()

    async def add_listener(self, nqn: str, address: ListenAddress) -> None:
        sub = self.subsystem(nqn)
        if address.trtype.upper() != "TCP":
            raise ConfigError(f"trtype {address.trtype} is not supported")
        if "TCP" not in self.transports:
            raise ConfigError("create the TCP transport before adding listeners")
        if address in sub.listeners:
            raise ConfigError(f"listener {address.traddr}:{address.trsvcid} already exists on {sub.nqn}")
        key = (address.traddr, address.trsvcid)
        if self._listen_refs.get(key, 0) == 0:
            await self.engine.listen(address)
        self._listen_refs[key] = self._listen_refs.get(key, 0) + 1
        sub.listeners.append(address)
        self.engine.discovery_changed()

    async def remove_listener(self, nqn: str, address: ListenAddress) -> None:
        sub = self.subsystem(nqn)
        match = [a for a in sub.listeners if (a.traddr, a.trsvcid) == (address.traddr, address.trsvcid)]
        if not match:
            raise ConfigError(f"listener {address.traddr}:{address.trsvcid} not found on {sub.nqn}")
        sub.listeners.remove(match[0])
        key = (address.traddr, address.trsvcid)
        self._listen_refs[key] -= 1
        if self._listen_refs[key] == 0:
            del self._listen_refs[key]
            await self.engine.unlisten(match[0])
        self.engine.discovery_changed()

    def add_namespace(self, nqn: str, bdev_name: str, **ids) -> int:
        sub = self.subsystem(nqn)
        if sub.is_discovery:
            raise ConfigError("the discovery subsystem has no namespaces")
        bdev = self.bdevs.get(bdev_name)
        if bdev is None:
            raise ConfigError(f"no bdev named {bdev_name}")
        ns = sub.add_namespace(bdev, **ids)
        self.engine.namespaces_changed(sub, [ns.nsid])
        return ns.nsid

    def remove_namespace(self, nqn: str, nsid: int) -> None:
        sub = self.subsystem(nqn)
        sub.remove_namespace(nsid)
        self.engine.namespaces_changed(sub, [nsid])

    def add_host(self, nqn: str, host: str) -> None:
        sub = self.subsystem(nqn)
        check_nqn(host)
        if host in sub.hosts:
            raise ConfigError(f"host {host} already allowed on {sub.nqn}")
        sub.hosts.append(host)
        self.engine.discovery_changed()

    def remove_host(self, nqn: str, host: str) -> None:
        sub = self.subsystem(nqn)
        if host not in sub.hosts:
            raise ConfigError(f"host {host} is not allowed on {sub.nqn}")
        sub.hosts.remove(host)
        self.engine.access_changed(sub)
        self.engine.discovery_changed()

    def allow_any_host(self, nqn: str, allow: bool) -> None:
        sub = self.subsystem(nqn)
        sub.allow_any_host = allow
        if not allow:
            self.engine.access_changed(sub)
        self.engine.discovery_changed()
