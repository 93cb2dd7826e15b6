"""What the NVMe/TCP benchmarks share: a random-filled backing file and a ``kahu target serve`` process."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
LISTENING = re.compile(r"listening tcp (\S+):(\d+)")


def fill_file(path: Path, size: int) -> None:
    """Random data, so neither side reads sparse holes or the shared zero page (which would flatter both)."""
    chunk = 1 << 22
    with open(path, "wb") as f:
        for _ in range(size // chunk):
            f.write(random.randbytes(chunk))


def start_target(
    config: Path, tree: Path = REPO, cpus: set[int] | None = None
) -> tuple[subprocess.Popen, str, int]:
    """``kahu target serve config`` from source ``tree``, pinned to ``cpus``: (process, address, port)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main", "target", "serve", str(config)],
        cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    seen = []
    for line in proc.stdout:  # type: ignore[union-attr]
        seen.append(line)
        match = LISTENING.search(line)
        if match:  # drain the rest of its output so it never blocks on a full pipe
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
            return proc, match.group(1), int(match.group(2))
    proc.wait()
    raise RuntimeError(f"target from {tree} did not start:\n" + "".join(seen))
