"""``kahu nvme`` end to end: the CLI as a subprocess against ``kahu target serve`` as a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import kahu_target_serve, run_kahu

NQN = "nqn.2026-11.io.kahu:cli-test"


def kahu(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_kahu(*args, timeout=timeout)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A file-backed soft target process; yields '127.0.0.1:PORT' (I/O and discovery on one port)."""
    workdir = tmp_path_factory.mktemp("cli-target")
    backing = workdir / "ns1.img"
    backing.write_bytes(bytes(16 << 20))
    config = workdir / "target.yaml"
    config.write_text(
        f"""subsystems:
  - nqn: {NQN}
    allow_any_host: true
    listeners: [{{traddr: 127.0.0.1, trsvcid: "0"}}]
    namespaces: [{{file: {backing}, block_size: 512}}]
"""
    )
    with kahu_target_serve(config, listeners=1) as served:
        host, port = served.addresses[0]
        yield f"{host}:{port}"


def test_discover(target: str) -> None:
    result = kahu("nvme", "discover", target)
    assert result.returncode == 0, result.stderr
    assert f"subnqn:  {NQN}" in result.stdout
    assert f"trsvcid: {target.split(':')[1]}" in result.stdout


def test_identify_json(target: str) -> None:
    result = kahu("nvme", "identify", target, "--nqn", NQN, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["subnqn"] == NQN
    assert info["namespaces"]["1"]["block_size"] == 512
    assert info["namespaces"]["1"]["num_blocks"] == (16 << 20) // 512


def test_write_then_read_back(target: str, tmp_path: Path) -> None:
    data = os.urandom(8 * 512)
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    wrote = kahu("nvme", "write", target, "--nqn", NQN, "--nsid", "1", "--lba", "100", "--input", str(source))
    assert wrote.returncode == 0, wrote.stderr
    out = tmp_path / "out.bin"
    read = kahu("nvme", "read", target, "--nqn", NQN, "--lba", "100", "--count", "8", "--output", str(out))
    assert read.returncode == 0, read.stderr
    assert out.read_bytes() == data

    filled = kahu("nvme", "write", target, "--nqn", NQN, "--lba", "200", "--pattern", "0xAB", "--count", "1")
    assert filled.returncode == 0, filled.stderr
    dump = kahu("nvme", "read", target, "--nqn", NQN, "--lba", "200", "--count", "1")
    assert dump.returncode == 0, dump.stderr
    assert dump.stdout.startswith("00019000  " + "ab " * 15 + "ab  |")  # byte offset 200 * 512


def test_perf_reports_figures(target: str) -> None:
    result = kahu("nvme", "perf", target, "--nqn", NQN, "--io-size", "4096", "--qd", "8",
                  "--pattern", "randread", "--time", "0.5", "--queues", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    match = re.search(r"IOPS ([\d,]+)\s+MB/s ([\d,.]+)\s+p50 ([\d.]+) us\s+p99 ([\d.]+) us", result.stdout)
    assert match, result.stdout
    assert int(match.group(1).replace(",", "")) > 0
    assert float(match.group(3)) <= float(match.group(4))


@pytest.mark.parametrize(
    "args, message",
    [
        (["identify", "127.0.0.1:70000", "--nqn", NQN], "port must be 1..65535"),
        (["identify", "127.0.0.1:x", "--nqn", NQN], "port must be 1..65535"),
        (["identify", "127.0.0.1", "--nqn", "not-an-nqn"], "NQN must start with 'nqn.'"),
        (["perf", "127.0.0.1", "--nqn", NQN, "--qd", "0"], "out of range 1..4096"),
        (["write", "127.0.0.1", "--nqn", NQN, "--lba", "0", "--pattern", "300"], "out of range 0..255"),
    ],
)
def test_bad_arguments_are_rejected(args: list[str], message: str) -> None:
    result = kahu("nvme", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_errors_from_the_target_are_reported(target: str) -> None:
    wrong = "nqn.2026-11.io.kahu:absent"
    result = kahu("nvme", "identify", target, "--nqn", wrong)
    assert result.returncode == 1
    assert wrong in result.stderr and "CONNECT_INVALID_PARAMETERS" in result.stderr
    size = (16 << 20) // 512
    beyond = kahu("nvme", "read", target, "--nqn", NQN, "--lba", str(size), "--count", "1")
    assert beyond.returncode == 1
    assert "LBA_OUT_OF_RANGE" in beyond.stderr
