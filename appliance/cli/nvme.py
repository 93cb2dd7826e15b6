"""``kahu nvme``: discover, identify, read, write and load-test NVMe/TCP subsystems with the Kahu host."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

try:  # cheaper socket I/O and callbacks than the default loop (lower latency, more IOPS); optional
    from uvloop import run as run_loop
except ImportError:
    from asyncio import run as run_loop

from ..nvmeof.host import Controller, NvmeError, discover
from ..nvmeof.host.perf import PATTERNS, run_perf
from ..nvmeof.spec import DISCOVERY_PORT, NVME_PORT, SubsystemType, TransportType
from ..nvmeof.target.model import ConfigError, check_nqn

MAX_IO_BYTES = 1 << 30


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    """'host', 'host:port', '[v6]:port' or a bare IPv6 address -> (host, port)."""
    host, port = text, str(default_port)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise argparse.ArgumentTypeError(f"bad address {text!r}: expected [IPv6]:PORT")
        port = rest[1:] or port
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host:
        raise argparse.ArgumentTypeError(f"bad address {text!r}: no host")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"bad address {text!r}: port must be 1..65535")
    return host, int(port)


def _nqn(text: str) -> str:
    try:
        check_nqn(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _count(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} out of range {low}..{high}")
        return value

    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("nvme", help="NVMe/TCP host tools: discover, identify, read, write, perf")
    sub = parser.add_subparsers(dest="nvme_command", required=True, metavar="ACTION")

    def action(
        name: str, help_text: str, default_port: int, func, nqn: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("address", metavar="ADDRESS[:PORT]", type=lambda t: parse_address(t, default_port),
                       help=f"target address (default port {default_port})")  # fmt: skip
        if nqn:
            p.add_argument("--nqn", required=True, type=_nqn, help="subsystem NQN")
        p.add_argument("--hostnqn", type=_nqn, help="host NQN (default: a generated uuid NQN)")
        p.add_argument("--timeout", type=float, default=10.0, help="command timeout in seconds")
        p.set_defaults(func=lambda args: _run(func(args)))
        return p

    action("discover", "list the subsystems a discovery controller advertises", DISCOVERY_PORT, _discover,
           nqn=False)  # fmt: skip
    p = action("identify", "show controller and namespace identify data", NVME_PORT, _identify)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = action("read", "read blocks (hexdump, or raw to --output)", NVME_PORT, _read)
    p.add_argument("--nsid", type=_count(1, 0xFFFFFFFE), default=1)
    p.add_argument("--lba", type=_count(0, (1 << 64) - 1), required=True)
    p.add_argument("--count", type=_count(1, 1 << 20), required=True, help="number of blocks")
    p.add_argument("--output", type=Path, help="write the data to this file instead of a hexdump")

    p = action("write", "write blocks from a file or a byte pattern", NVME_PORT, _write)
    p.add_argument("--nsid", type=_count(1, 0xFFFFFFFE), default=1)
    p.add_argument("--lba", type=_count(0, (1 << 64) - 1), required=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="file with whole blocks of data")
    source.add_argument("--pattern", type=_count(0, 255), help="fill byte, e.g. 0xAB (needs --count)")
    p.add_argument("--count", type=_count(1, 1 << 20), help="number of blocks for --pattern")

    p = action("perf", "closed-loop load: IOPS, MB/s, p50/p99 latency", NVME_PORT, _perf)
    p.add_argument("--nsid", type=_count(1, 0xFFFFFFFE), default=1)
    p.add_argument("--io-size", type=_count(512, 1 << 24), default=4096, help="bytes per I/O")
    p.add_argument("--qd", type=_count(1, 4096), default=32, help="I/Os in flight")
    p.add_argument("--pattern", choices=PATTERNS, default="randread")
    p.add_argument("--time", type=float, default=5.0, help="seconds to run")
    p.add_argument("--queues", type=_count(1, 64), default=1, help="I/O queues (TCP connections)")
    p.add_argument("--hdgst", action="store_true", help="negotiate header digests")
    p.add_argument("--ddgst", action="store_true", help="negotiate data digests")


def _run(work: Awaitable[int]) -> int:
    try:
        return run_loop(work)
    except NvmeError as e:
        print(f"kahu nvme: {e}", file=sys.stderr)
        return 1


async def _connect(args: argparse.Namespace, **options) -> Controller:
    host, port = args.address
    return await Controller.connect(
        host, port, args.nqn, hostnqn=args.hostnqn, timeout=args.timeout, **options
    )


async def _discover(args: argparse.Namespace) -> int:
    host, port = args.address
    entries = await discover(host, port, hostnqn=args.hostnqn, timeout=args.timeout)
    print(f"Discovery Log at {host}:{port}: {len(entries)} entries")
    for i, e in enumerate(entries):
        trtype = _enum_name(TransportType, e.trtype)
        subtype = _enum_name(SubsystemType, e.subtype)
        print(f"===== entry {i} =====")
        print(f"trtype:  {trtype}\nsubtype: {subtype}\nportid:  {e.portid}\ntrsvcid: {e.trsvcid.strip()}")
        print(f"subnqn:  {e.subnqn}\ntraddr:  {e.traddr.strip()}")
    return 0


def _enum_name(kind, value: int) -> str:
    try:
        return kind(value).name.lower()
    except ValueError:
        return str(value)


async def _identify(args: argparse.Namespace) -> int:
    async with await _connect(args) as ctrl:
        ident = ctrl.identify
        namespaces = {
            nsid: {**asdict(ns), "nguid": ns.nguid.hex(), "eui64": ns.eui64.hex(),
                   "uuid": str(ns.uuid) if ns.uuid else None}
            for nsid, ns in sorted(ctrl.namespaces.items())
        }  # fmt: skip
        info = {
            "subnqn": ident.subnqn, "cntlid": ctrl.cntlid, "serial_number": ident.sn,
            "model_number": ident.mn, "firmware": ident.fr,
            "version": f"{ident.ver >> 16}.{(ident.ver >> 8) & 0xFF}.{ident.ver & 0xFF}",
            "mdts": ident.mdts, "maxcmd": ident.maxcmd, "nn": ident.nn, "ioccsz": ident.ioccsz,
            "kas": ident.kas, "oncs": ident.oncs, "vwc": ident.vwc, "sgls": ident.sgls,
            "namespaces": namespaces,
        }  # fmt: skip
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key != "namespaces":
            print(f"{key:14} {value}")
    for nsid, ns in namespaces.items():
        size = ns["block_size"] * ns["num_blocks"]
        print(f"namespace {nsid}: {ns['num_blocks']} blocks of {ns['block_size']} bytes ({size} bytes), "
              f"nguid {ns['nguid']} uuid {ns['uuid']}")  # fmt: skip
    return 0


def _namespace(ctrl: Controller, nsid: int):
    ns = ctrl.namespaces.get(nsid)
    if ns is None:
        raise ValueError(f"{ctrl.subnqn} has no namespace {nsid} (has {sorted(ctrl.namespaces)})")
    return ns


async def _read(args: argparse.Namespace) -> int:
    async with await _connect(args) as ctrl:
        ns = _namespace(ctrl, args.nsid)
        size = args.count * ns.block_size
        if size > MAX_IO_BYTES:
            raise ValueError(f"read of {size} bytes exceeds {MAX_IO_BYTES}")
        buf = bytearray(size)
        await ctrl.read(args.nsid, args.lba, buf)
    if args.output:
        args.output.write_bytes(buf)
        print(f"read {size} bytes from LBA {args.lba} to {args.output}")
    else:
        sys.stdout.write(hexdump(buf, args.lba * ns.block_size))
    return 0


async def _write(args: argparse.Namespace) -> int:
    async with await _connect(args) as ctrl:
        ns = _namespace(ctrl, args.nsid)
        if args.input is not None:
            data = args.input.read_bytes()
            if not data or len(data) % ns.block_size:
                raise ValueError(f"{args.input} is {len(data)} bytes, not whole {ns.block_size}-byte blocks")
        else:
            if args.count is None:
                raise ValueError("--pattern needs --count")
            data = bytes([args.pattern]) * (args.count * ns.block_size)
        if len(data) > MAX_IO_BYTES:
            raise ValueError(f"write of {len(data)} bytes exceeds {MAX_IO_BYTES}")
        await ctrl.write(args.nsid, args.lba, data)
    print(f"wrote {len(data)} bytes at LBA {args.lba}")
    return 0


async def _perf(args: argparse.Namespace) -> int:
    if args.time <= 0:
        raise ValueError("--time must be positive")
    async with await _connect(args, io_queues=args.queues, hdgst=args.hdgst, ddgst=args.ddgst) as ctrl:
        r = await run_perf(ctrl, args.nsid, args.io_size, args.qd, args.pattern, args.time)
    print(f"{r.pattern} io_size={r.io_size} qd={r.qd} queues={r.queues} time={r.seconds:.2f}s")
    print(f"IOPS {r.iops:,.0f}  MB/s {r.mbps:,.1f}  p50 {r.p50_us:.1f} us  p99 {r.p99_us:.1f} us")
    return 0


def hexdump(data: bytes | bytearray, base: int = 0) -> str:
    """Classic 16-bytes-per-line dump; runs of identical lines collapse into '*' like hexdump(1)."""
    lines, previous, starred = [], None, False
    for off in range(0, len(data), 16):
        row = bytes(data[off : off + 16])
        if row == previous and off + 16 < len(data):
            if not starred:
                lines.append("*")
                starred = True
            continue
        previous, starred = row, False
        hexes = " ".join(f"{b:02x}" for b in row)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{base + off:08x}  {hexes:<47}  |{text}|")
    lines.append(f"{base + len(data):08x}")
    return "\n".join(lines) + "\n"
