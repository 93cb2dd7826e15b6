"""SPDK's own NVMe/TCP host (``spdk_nvme_perf``) against the soft target.

The proof that the soft target serves a standard host other than Linux's and Kahu's. Runs when
``spdk_nvme_perf`` is named by $KAHU_SPDK_PERF or found on PATH (extra arguments, such as
``--no-huge -s 1024`` on machines without hugepages, come from $KAHU_SPDK_PERF_ARGS); skipped with
that reason otherwise.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "soft"))

from ports import free_port

from appliance.spdk_rpc.lifecycle import NodeTarget
from appliance.spdk_rpc.nodeconfig import parse_node_config

PERF_ENV = "KAHU_SPDK_PERF"
PERF = shutil.which(os.environ.get(PERF_ENV, "spdk_nvme_perf"))
TOTAL = re.compile(r"^\s*Total\s*:\s*([\d.]+)\s+([\d.]+)", re.MULTILINE)

pytestmark = pytest.mark.skipif(
    PERF is None, reason=f"no SPDK perf tool: ${PERF_ENV} is unset and no spdk_nvme_perf on PATH"
)


@pytest.mark.parametrize(("workload", "io_size", "qd"), [("randread", 4096, 32), ("write", 131072, 16)])
def test_spdk_perf_against_soft_target(tmp_path: Path, workload: str, io_size: int, qd: int) -> None:
    port = free_port()
    config = parse_node_config({
        "name": "perf",
        "data_addresses": [{"address": "127.0.0.1", "port": port}],
        "discovery_port": free_port(),
        "allow_any_host": True,
        "drives": [{"malloc": "256MiB", "block_size": 4096}],
        "spdk": {"rpc_socket": str(tmp_path / "kahu.sock")},
        "transport": {"rdma": False},
    })  # fmt: skip

    async def scenario() -> str:
        async with NodeTarget(config, tmp_path / "state", soft=True):
            trid = f"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{port} subnqn:{config.nqn}"
            argv = [PERF, "-r", trid, "-q", str(qd), "-o", str(io_size), "-w", workload, "-t", "3",
                    *shlex.split(os.environ.get("KAHU_SPDK_PERF_ARGS", ""))]  # fmt: skip
            done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"spdk_nvme_perf failed:\n{done.stdout}\n{done.stderr}"
            return done.stdout

    output = asyncio.run(scenario())
    total = TOTAL.search(output)
    assert total, f"no Total line in perf output:\n{output}"
    iops = float(total.group(1))
    assert iops > 0, output
    print(f"spdk_nvme_perf {workload} {io_size}B QD{qd} against the soft target: {iops:.0f} IOPS")
