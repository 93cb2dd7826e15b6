"""Soft-target capacity: a raw pipelined NVMe/TCP client drives ``kahu target serve``, no Kahu host.

The target runs as its own process pinned to one CPU; every I/O connection is driven by its own
client process pinned to the other CPUs, so the client's Python cost is not on the target's core
(as with SPDK's perf tool and target on separate cores). The client keeps the queue full, builds
each command by patching a prebuilt capsule and sends everything one receive freed in one
``sendmsg``. Workloads: 4 KiB random read/write at QD32 and 128 KiB sequential read/write at QD16,
over 1 and 4 connections (the queue depth is the total, split over the connections, as
spdk_nvme_perf does), on a RAM (malloc) and a file namespace. The yardstick, measured in the same
run on the target's CPU: one thread doing ``os.preadv``/``os.pwritev`` at the same sizes on the
same backing file and on a tmpfs file as large as the RAM namespace.

    .venv/bin/python bench/target_raw.py [--quick] [--tree DIR ...] [--repeat N]

``--tree`` (repeatable) serves from other source trees, e.g. an export of HEAD, so before and
after are measured back to back in one run. Prints a table, writes bench/results/target_raw.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import socket
import struct
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.nvmeof.host.controller import CC_IO_ENTRY_SIZES  # noqa: E402
from appliance.nvmeof.host.perf import percentile  # noqa: E402
from appliance.nvmeof.host.queue import connect_data  # noqa: E402
from appliance.nvmeof.pdu import (  # noqa: E402
    CAPSULE_CMD_HDR,
    CH,
    DATA_HDR,
    CapsuleCmd,
    CapsuleResp,
    ICReq,
    ICResp,
    Sqe,
    decode,
    encode_bytes,
)
from appliance.nvmeof.spec import (  # noqa: E402
    CC_EN,
    SGL_DATA_BLOCK_OFFSET,
    SGL_TRANSPORT_DATA_BLOCK,
    AdminOpcode,
    FabricsType,
    IoOpcode,
    PduFlag,
    PduType,
    Property,
)
from appliance.procs import stop_process  # noqa: E402
from bench.common import RESULTS, fill_file, start_target  # noqa: E402

NQN = "nqn.2026-11.io.kahu:bench-raw"
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6b61687a-6265-6e63-6800-000000000001"
BLOCK = 4096
NAMESPACES = {"ram": 1, "file": 2}
WORKLOADS = [("randread", 4096, 32), ("randwrite", 4096, 32), ("read", 131072, 16), ("write", 131072, 16)]
CONNECTIONS = (1, 4)
WARMUP = 0.5
RECV_BUF = 8 << 20
LATENCY_SAMPLE = 50_000
SLBA = struct.Struct("<Q")  # CDW10-11 of a capsule, at PDU offset 48
CQE_CID_STATUS = struct.Struct("<HH")  # at PDU offset 20 of a CapsuleResp
C2H_SUCCESS, LAST_PDU = int(PduFlag.SUCCESS), int(PduFlag.LAST_PDU)
# PDU types as plain ints for the receive loop
T_RESP, T_H2C, T_C2H, T_R2T = (
    int(t) for t in (PduType.CAPSULE_RESP, PduType.H2C_DATA, PduType.C2H_DATA, PduType.R2T)
)


# ------------------------------------------------------------------ target process


def target_config(workdir: Path, backing: Path, ram_bytes: int) -> Path:
    config = workdir / f"target-{os.getpid()}-{time.monotonic_ns()}.yaml"
    config.write_text(
        f"""transport: {{max_queue_depth: 128, in_capsule_data_size: 4096}}
subsystems:
  - nqn: {NQN}
    allow_any_host: true
    listeners: [{{traddr: 127.0.0.1, trsvcid: "0"}}]
    namespaces:
      - {{malloc: {ram_bytes}, block_size: {BLOCK}, nsid: 1}}
      - {{file: {backing}, block_size: {BLOCK}, nsid: 2}}
"""
    )
    return config


# ------------------------------------------------------------------ queue setup (blocking, not timed)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("target closed the connection")
        out += chunk
    return bytes(out)


def exchange(sock: socket.socket, pdu) -> object:
    sock.sendall(encode_bytes(pdu))
    ch = recv_exact(sock, 8)
    return decode(ch + recv_exact(sock, CH.unpack(ch)[4] - 8), from_host=False)


def fabrics(sock: socket.socket, fctype: int, data: bytes = b"", **cdw) -> int:
    """Run one Fabrics command; returns CQE DW0."""
    sqe = Sqe(AdminOpcode.FABRICS, cid=1, nsid=fctype, flags=0, **cdw)
    if data:
        sqe.sgl_id, sqe.sgl_len = SGL_DATA_BLOCK_OFFSET, len(data)
    resp = exchange(sock, CapsuleCmd(sqe, data))
    assert isinstance(resp, CapsuleResp) and resp.cqe.status >> 1 == 0, resp
    return resp.cqe.dw0


def open_queue(port: int, qid: int, cntlid: int = 0xFFFF) -> tuple[socket.socket, int, int]:
    """ICReq and Connect; returns the socket, the CNTLID and MAXH2CDATA."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    icresp = exchange(sock, ICReq())
    assert isinstance(icresp, ICResp), icresp
    data = connect_data(uuid.uuid5(uuid.NAMESPACE_URL, HOSTNQN).bytes, cntlid, NQN, HOSTNQN)
    dw0 = fabrics(sock, FabricsType.CONNECT, bytes(data), cdw10=qid << 16, cdw11=127)
    return sock, dw0 & 0xFFFF, icresp.maxh2cdata


def open_controller(port: int) -> tuple[socket.socket, int]:
    """An enabled admin queue (kept open for the run) and its CNTLID."""
    sock, cntlid, _ = open_queue(port, 0)
    fabrics(sock, FabricsType.PROPERTY_SET, cdw11=Property.CC, cdw12=CC_EN | CC_IO_ENTRY_SIZES)
    return sock, cntlid


# ------------------------------------------------------------------ the pipelined client


@dataclass(frozen=True, slots=True)
class Job:
    port: int
    cntlid: int
    qid: int
    nsid: int
    pattern: str
    io_size: int
    qd: int
    first_block: int  # this connection's region, in BLOCK units
    blocks: int
    seconds: float  # 0: stop after ``limit`` commands instead
    limit: int = 0


@dataclass(slots=True)
class Outcome:
    ios: int  # completed in the measured window
    elapsed: float
    errors: int
    latencies_ns: list[int]
    total: int  # completed in all, warm-up and drain included


class Driver:
    """Keeps ``qd`` commands in flight on one I/O queue."""

    def __init__(self, job: Job):
        self.job = job
        self.sock, _, _ = open_queue(job.port, job.qid, job.cntlid)
        write = job.pattern.endswith("write")
        self.payload = memoryview(random.randbytes(job.io_size))
        self.in_capsule = write and job.io_size <= 4096
        self.prefix = [self._capsule_prefix(cid, write) for cid in range(job.qd)]
        nlb = job.io_size // BLOCK
        self.suffix = struct.pack("<I12x", nlb - 1)  # CDW12 (NLB), CDW13-15
        slots = job.blocks // nlb
        rng = random.Random(job.qid)
        if job.pattern.startswith("rand"):
            self.lbas = [job.first_block + rng.randrange(slots) * nlb for _ in range(1 << 16)]
        else:
            self.lbas = [job.first_block + i * nlb for i in range(slots)]
        self.next_lba = 0
        self.submitted = [0] * job.qd

    def _capsule_prefix(self, cid: int, write: bool) -> bytes:
        """The capsule up to CDW10, for command ``cid``: everything but the LBA and NLB is fixed."""
        job = self.job
        icd = self.in_capsule
        plen = 72 + (job.io_size if icd else 0)
        sgl_id = SGL_DATA_BLOCK_OFFSET if icd else SGL_TRANSPORT_DATA_BLOCK
        opc = IoOpcode.WRITE if write else IoOpcode.READ
        return CAPSULE_CMD_HDR.pack(PduType.CAPSULE_CMD, 0, 72, 72 if icd else 0, plen, opc, 0x40, cid,
                                    job.nsid, 0, 0, 0, 0, job.io_size, sgl_id, 0, 0, 0, 0, 0,
                                    0)[:48]  # fmt: skip

    def issue(self, cid: int, out: list, now: int) -> None:
        lba = self.lbas[self.next_lba]
        self.next_lba = (self.next_lba + 1) % len(self.lbas)
        out.append(self.prefix[cid] + SLBA.pack(lba) + self.suffix)
        if self.in_capsule:
            out.append(self.payload)
        self.submitted[cid] = now

    def h2c(self, pdu: memoryview, out: list) -> None:
        """Answer an R2T with one H2CData carrying all it asked for."""
        _, _, _, _, _, cid, ttag, r2to, r2tl = DATA_HDR.unpack_from(pdu)
        out.append(DATA_HDR.pack(T_H2C, LAST_PDU, 24, 24, 24 + r2tl, cid, ttag, r2to, r2tl))
        out.append(self.payload[r2to : r2to + r2tl])

    def run(self, start) -> Outcome:
        start.wait()
        job = self.job
        sock = self.sock
        buf = bytearray(RECV_BUF)
        view = memoryview(buf)
        pos = end = skip = 0
        out: list = []
        now = time.perf_counter_ns()
        for cid in range(job.qd):
            self.issue(cid, out, now)
        self.send(out)
        t0 = now + int(WARMUP * 1e9) if job.seconds else now
        stop_at = t0 + int(job.seconds * 1e9)
        issued = inflight = job.qd
        done = errors = 0
        base = final = t1 = -1
        latencies: list[int] = []
        more = True
        while inflight:
            n = sock.recv_into(view[end:])
            if not n:
                raise ConnectionError("target closed the I/O queue")
            end += n
            now = time.perf_counter_ns()
            if base < 0 and now >= t0:
                base, t0 = done, now
            if more and (now >= stop_at if job.seconds else issued >= job.limit):
                more, final, t1 = False, done, now
            sample = base >= 0 and more and len(latencies) < 4 * LATENCY_SAMPLE
            out = []
            while True:
                if skip:  # data of a C2HData whose header was handled
                    take = min(skip, end - pos)
                    pos, skip = pos + take, skip - take
                    if skip:
                        break
                if end - pos < 24:
                    break
                ptype, flags = buf[pos], buf[pos + 1]
                if ptype == T_R2T:
                    self.h2c(view[pos : pos + 24], out)
                    pos += 24
                    continue
                if ptype == T_RESP:
                    cid, status = CQE_CID_STATUS.unpack_from(buf, pos + 20)
                    errors += status >> 1 != 0
                elif ptype == T_C2H:
                    cid = DATA_HDR.unpack_from(buf, pos)[5]
                    skip = CH.unpack_from(buf, pos)[4] - 24
                    if not flags & C2H_SUCCESS:
                        pos += 24
                        continue
                else:
                    raise RuntimeError(f"unexpected PDU type 0x{ptype:02x} from the target")
                pos += 24
                done += 1
                inflight -= 1
                if sample:
                    latencies.append(now - self.submitted[cid])
                if more:
                    self.issue(cid, out, now)
                    issued += 1
                    inflight += 1
            if out:
                self.send(out)
            if RECV_BUF - end < 1 << 20:  # keep room for the next receive
                buf[: end - pos] = buf[pos:end]
                pos, end = 0, end - pos
        sock.close()
        sample = random.sample(latencies, min(len(latencies), LATENCY_SAMPLE))
        return Outcome(final - base, (t1 - t0) / 1e9, errors, sample, done)

    def send(self, parts: list) -> None:
        sent = self.sock.sendmsg(parts)
        total = sum(len(p) for p in parts)
        if sent < total:
            self.sock.sendall(b"".join(bytes(p) for p in parts)[sent:])


def drive(job: Job, cpus: set[int], start, results) -> None:
    """One client process: one I/O queue, started with the others by ``start`` (a barrier)."""
    os.sched_setaffinity(0, cpus)
    results.put(Driver(job).run(start))


# ------------------------------------------------------------------ runs


@dataclass(slots=True)
class Row:
    tree: str
    namespace: str
    pattern: str
    io_size: int
    qd: int
    connections: int  # 0: the yardstick
    iops: float
    mbps: float
    p50_us: float
    p99_us: float
    cpu_us: float = 0.0  # target CPU time per I/O (user + system, all threads): robust to a busy machine
    errors: int = 0


def run_target(port: int, cntlid: int, ns: str, workload: tuple[str, int, int], connections: int,
               seconds: float, limit: int, region_blocks: int, cpus: set[int]) -> list[Outcome]:  # fmt: skip
    """One workload over ``connections`` client processes started together."""
    pattern, io_size, qd = workload
    per = region_blocks // connections
    ctx = mp.get_context("fork")
    start = ctx.Barrier(connections)
    jobs = [
        Job(port, cntlid, i + 1, NAMESPACES[ns], pattern, io_size, qd // connections, i * per, per,
            seconds, limit // connections)
        for i in range(connections)
    ]  # fmt: skip
    results = ctx.SimpleQueue()
    procs = [ctx.Process(target=drive, args=(job, cpus, start, results)) for job in jobs]
    for proc in procs:
        proc.start()
    outcomes = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    return outcomes


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(tree: str, ns: str, workload: tuple[str, int, int], connections: int,
              outcomes: list[Outcome], cpu: float) -> Row:  # fmt: skip
    pattern, io_size, qd = workload
    iops = sum(o.ios / o.elapsed for o in outcomes)
    lat = sorted(x for o in outcomes for x in o.latencies_ns)
    cpu_us = cpu / sum(o.total for o in outcomes) * 1e6
    return Row(tree, ns, pattern, io_size, qd, connections, iops, iops * io_size / 1e6,
               percentile(lat, 0.5) / 1e3, percentile(lat, 0.99) / 1e3, cpu_us,
               sum(o.errors for o in outcomes))  # fmt: skip


def yardstick(path: Path, ns: str, workload: tuple[str, int, int], seconds: float, cpus: set[int]) -> Row:
    """The same I/O done by one thread with preadv/pwritev, on the target's CPU."""
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        iops, lat, cpu_us = pool.apply(raw_io, (path, workload, seconds, cpus))
    pattern, io_size, qd = workload
    return Row("yardstick", ns, pattern, io_size, qd, 0, iops, iops * io_size / 1e6,
               percentile(lat, 0.5) / 1e3, percentile(lat, 0.99) / 1e3, cpu_us)  # fmt: skip


def raw_io(path: Path, workload: tuple[str, int, int], seconds: float,
           cpus: set[int]) -> tuple[float, list[int], float]:  # fmt: skip
    """IOPS, sorted latencies (ns) and CPU time per I/O (us) of one thread's closed loop."""
    os.sched_setaffinity(0, cpus)
    pattern, io_size, _ = workload
    fd = os.open(path, os.O_RDWR)
    try:
        slots = os.fstat(fd).st_size // io_size
        rng = random.Random(0)
        offsets = [rng.randrange(slots) * io_size for _ in range(1 << 16)] if pattern.startswith("rand") \
            else [i * io_size for i in range(slots)]  # fmt: skip
        buf = bytearray(random.randbytes(io_size))
        op = os.pwritev if pattern.endswith("write") else os.preadv
        lat: list[int] = []
        n, began, cpu = 0, time.perf_counter_ns(), time.process_time()
        deadline = began + int(seconds * 1e9)
        now = began
        while now < deadline:
            op(fd, [buf], offsets[n % len(offsets)])
            n += 1
            then, now = now, time.perf_counter_ns()
            if len(lat) < LATENCY_SAMPLE:
                lat.append(now - then)
        cpu = time.process_time() - cpu
    finally:
        os.close(fd)
    return n / ((now - began) / 1e9), sorted(lat), cpu / n * 1e6


def print_header() -> None:
    print(f"{'workload':20} {'ns':5} {'path':22} {'IOPS':>10} {'MB/s':>9} {'p50 us':>8} {'p99 us':>8} "
          f"{'cpu us/io':>9}")  # fmt: skip


def print_rows(rows: list[Row]) -> None:
    for r in rows:
        workload = f"{r.io_size // 1024}K {r.pattern} QD{r.qd}"
        path = "preadv/pwritev" if r.connections == 0 else f"{r.tree} x{r.connections}"
        errors = f"  ({r.errors} errors)" if r.errors else ""
        print(f"{workload:20} {r.namespace:5} {path:22} {r.iops:>10,.0f} {r.mbps:>9,.1f} "
              f"{r.p50_us:>8.1f} {r.p99_us:>8.1f} {r.cpu_us:>9.2f}{errors}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s per run and 256 MiB namespaces")
    parser.add_argument("--seconds", type=float, help="seconds per run (default 3, or 1 with --quick)")
    parser.add_argument("--tree", action="append", type=Path, help="serve from this source tree (repeatable)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each workload per tree")
    parser.add_argument("--ns", choices=sorted(NAMESPACES), action="append", help="namespaces (default both)")
    parser.add_argument("--workload", action="append", help="e.g. randread (default all)")
    parser.add_argument("--connections", type=int, action="append", help="default 1 and 4")
    parser.add_argument("--no-yardstick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "target_raw.json")
    args = parser.parse_args()
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    size = (256 if args.quick else 1024) << 20
    trees = args.tree or [REPO]
    workloads = [w for w in WORKLOADS if not args.workload or w[0] in args.workload]
    namespaces = args.ns or list(NAMESPACES)
    all_cpus = os.sched_getaffinity(0)
    target_cpus = {min(all_cpus)}
    client_cpus = all_cpus - target_cpus or all_cpus
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="kahu-bench-raw-") as tmp:
        workdir = Path(tmp)
        backing = workdir / "ns2.img"
        fill_file(backing, size)
        targets = []
        print_header()
        try:
            for tree in trees:
                proc, _, port = start_target(target_config(workdir, backing, size), tree, target_cpus)
                admin, cntlid = open_controller(port)
                targets.append((tree, proc, admin, port, cntlid))
                fill = ("write", 131072, 16)  # RAM starts as the shared zero page: write it all once
                run_target(port, cntlid, "ram", fill, 1, 0, size // 131072, size // BLOCK, client_cpus)
            for workload in workloads:
                for ns in namespaces:
                    for connections in args.connections or CONNECTIONS:
                        for _ in range(args.repeat):
                            for tree, proc, _, port, cntlid in targets:
                                cpu = cpu_seconds(proc.pid)
                                outcomes = run_target(port, cntlid, ns, workload, connections, seconds, 0,
                                                      size // BLOCK, client_cpus)  # fmt: skip
                                cpu = cpu_seconds(proc.pid) - cpu
                                label = tree.name if len(trees) > 1 else "soft target"
                                rows.append(summarize(label, ns, workload, connections, outcomes, cpu))
                                print_rows(rows[-1:])
        finally:
            for _, proc, admin, _, _ in targets:
                admin.close()
                stop_process(proc)
        if not args.no_yardstick:
            shm = Path("/dev/shm") / f"kahu-bench-raw-{os.getpid()}"
            try:
                fill_file(shm, size)
                for workload in workloads:
                    for ns in namespaces:
                        path = shm if ns == "ram" else backing
                        rows.append(yardstick(path, ns, workload, seconds, target_cpus))
            finally:
                shm.unlink(missing_ok=True)
    print()
    print_header()
    print_rows(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"seconds_per_run": seconds, "namespace_bytes": size, "cpus": sorted(all_cpus),
            "target_cpus": sorted(target_cpus), "python": sys.version,
            "trees": [str(t) for t in trees]}  # fmt: skip
    args.out.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in rows]}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
