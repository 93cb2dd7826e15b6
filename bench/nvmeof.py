"""NVMe/TCP host benchmark: the Kahu host against the soft target, next to the raw file as yardstick.

The soft target runs as its own process (``kahu target serve``) over a file-backed namespace, so
host and target use separate cores; the host runs on uvloop when installed, like ``kahu nvme perf``.
Workloads: 4 KiB random read/write at QD1 and QD32, 128 KiB sequential read/write at QD16, each on
1 and 4 I/O queues. The yardstick reads and writes the same backing file with
``os.preadv``/``os.pwritev`` at the same sizes: QD1 on one thread, deeper queue depths on a thread
pool. Prints a table, writes bench/results/nvmeof.json and nvmeof.png.

    .venv/bin/python bench/nvmeof.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from appliance.cli.nvme import run_loop  # noqa: E402  (uvloop when installed, as for `kahu nvme perf`)
from appliance.nvmeof.host import Controller  # noqa: E402
from appliance.nvmeof.host.perf import PerfResult, run_perf  # noqa: E402
from appliance.procs import stop_process  # noqa: E402
from bench.common import RESULTS, fill_file, start_target  # noqa: E402

NQN = "nqn.2026-11.io.kahu:bench"
BLOCK = 4096
WORKLOADS = [  # (pattern, io_size, qd)
    ("randread", 4096, 1),
    ("randread", 4096, 32),
    ("randwrite", 4096, 1),
    ("randwrite", 4096, 32),
    ("read", 131072, 16),
    ("write", 131072, 16),
]
QUEUES = (1, 4)


def target_config(workdir: Path, backing: Path) -> Path:
    config = workdir / "target.yaml"
    config.write_text(
        f"""transport: {{max_queue_depth: 128, in_capsule_data_size: 4096}}
subsystems:
  - nqn: {NQN}
    serial_number: KAHUBENCH0001
    allow_any_host: true
    listeners: [{{traddr: 127.0.0.1, trsvcid: "0"}}]
    namespaces: [{{file: {backing}, block_size: {BLOCK}}}]
"""
    )
    return config


async def host_run(addr: str, port: int, pattern: str, io_size: int, qd: int, queues: int, seconds: float):
    ctrl = await Controller.connect(addr, port, NQN, io_queues=queues, queue_depth=128)
    try:
        return await run_perf(ctrl, 1, io_size, qd, pattern, seconds)
    finally:
        await ctrl.close()


def raw_run(path: Path, pattern: str, io_size: int, qd: int, seconds: float) -> PerfResult:
    """The yardstick: the same I/O straight to the backing file, ``qd`` threads in a closed loop."""
    fd = os.open(path, os.O_RDWR)
    slots = os.fstat(fd).st_size // io_size
    write = pattern.endswith("write")
    sequential = not pattern.startswith("rand")
    cursor = [0]
    lock = threading.Lock()
    deadline = time.perf_counter_ns() + int(seconds * 1e9)

    def worker() -> list[int]:
        buf = bytearray(random.randbytes(io_size))
        lat = []
        rng = random.Random()
        while True:
            if sequential:
                with lock:
                    slot = cursor[0]
                    cursor[0] = (slot + 1) % slots
            else:
                slot = rng.randrange(slots)
            start = time.perf_counter_ns()
            if write:
                os.pwritev(fd, [buf], slot * io_size)
            else:
                os.preadv(fd, [buf], slot * io_size)
            end = time.perf_counter_ns()
            lat.append(end - start)
            if end >= deadline:
                return lat

    began = time.perf_counter_ns()
    try:
        if qd == 1:
            latencies = worker()
        else:
            with ThreadPoolExecutor(qd) as pool:
                latencies = [x for part in pool.map(lambda _: worker(), range(qd)) for x in part]
    finally:
        os.close(fd)
    elapsed = (time.perf_counter_ns() - began) / 1e9
    return PerfResult.measured(pattern, io_size, qd, 0, latencies, elapsed)


def label(r: dict) -> str:
    size = f"{r['io_size'] // 1024}K"
    return f"{size} {r['pattern']} QD{r['qd']}"


def print_table(rows: list[dict]) -> None:
    print(f"{'workload':24} {'path':12} {'IOPS':>10} {'MB/s':>9} {'p50 us':>9} {'p99 us':>9}")
    for r in rows:
        path = "raw file" if r["queues"] == 0 else f"nvme/tcp x{r['queues']}"
        numbers = f"{r['iops']:>10,.0f} {r['mbps']:>9,.1f} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f}"
        print(f"{label(r):24} {path:12} {numbers}")


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(label(r) for r in rows))
    paths = sorted({r["queues"] for r in rows})
    fig, (ax_iops, ax_lat) = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(paths)
    for i, q in enumerate(paths):
        by = {label(r): r for r in rows if r["queues"] == q}
        xs = [j + i * width for j in range(len(workloads))]
        name = "raw file (preadv/pwritev)" if q == 0 else f"Kahu host, {q} queue(s)"
        ax_iops.bar(xs, [by[w]["iops"] if w in by else 0 for w in workloads], width, label=name)
        ax_lat.bar(xs, [by[w]["p50_us"] if w in by else 0 for w in workloads], width, label=name)
    for ax, title in ((ax_iops, "IOPS"), (ax_lat, "p50 latency (us)")):
        ax.set_xticks(
            [j + 0.4 - width / 2 for j in range(len(workloads))], workloads, rotation=20, ha="right"
        )
        ax.set_title(title)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle("NVMe/TCP: Kahu host -> soft target (separate process) vs raw backing file")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s per run and a 256 MiB namespace")
    parser.add_argument("--seconds", type=float, help="seconds per run (default 5, or 1 with --quick)")
    args = parser.parse_args()
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    size = (256 if args.quick else 1024) << 20
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kahu-bench-") as tmp:
        workdir = Path(tmp)
        backing = workdir / "ns1.img"
        fill_file(backing, size)
        proc, addr, port = start_target(target_config(workdir, backing))
        try:
            for pattern, io_size, qd in WORKLOADS:
                for queues in QUEUES:
                    r = run_loop(host_run(addr, port, pattern, io_size, qd, queues, seconds))
                    rows.append(r.as_dict())
        finally:
            stop_process(proc)
        for pattern, io_size, qd in WORKLOADS:
            rows.append(raw_run(backing, pattern, io_size, qd, seconds).as_dict())
    rows.sort(key=lambda r: (WORKLOADS.index((r["pattern"], r["io_size"], r["qd"])), r["queues"]))
    print_table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "seconds_per_run": seconds,
        "namespace_bytes": size,
        "cpus": os.cpu_count(),
        "python": sys.version,
    }
    (RESULTS / "nvmeof.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    plot(rows, RESULTS / "nvmeof.png")
    print(f"wrote {RESULTS / 'nvmeof.json'} and {RESULTS / 'nvmeof.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
