"""Interop with Linux's own NVMe/TCP: its host against the soft target, the Kahu host against nvmet.

Each test boots Debian's kernel under QEMU (see ``linux_guest``). The smoke test needs nothing from
Kahu: the guest's nvme-tcp host talks to the guest's own nvmet, proving the harness itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TEST_NQN as NQN
from linux_guest import GUEST_IP, HOST_IP, Guest, GuestResult, run_guest
from ports import free_port

from appliance.nvmeof.host import Controller, discover

pytestmark = pytest.mark.qemu

LINUX_NQN = "nqn.2026-11.io.kahu:linux-nvmet"
KAHU_HOSTNQN = "nqn.2026-11.io.kahu:host-under-test"
PATTERN = os.urandom(256 * 1024)  # 64 blocks of 4 KiB, random so a stale or zero read cannot pass
PATTERN_SEEK_4K = 3  # where the Linux host writes it: byte offset 12 KiB
PATTERN_SLBA = 16  # where the Kahu host writes it (512-byte blocks)

# Shell helpers for the guest: export a loop device over a tmpfs file as an nvmet subsystem on
# 0.0.0.0:4420 (nvmet serves its discovery controller on every port), then connect and check I/O.
NVMET_SETUP = (
    f"export seek4k={PATTERN_SEEK_4K}\n"
    + r"""
nvmet_export() {
    nqn=$1
    truncate -s 64M /tmp/backing.img || return 1
    losetup /dev/loop0 /tmp/backing.img || return 1
    cd /sys/kernel/config/nvmet || return 1
    mkdir subsystems/$nqn && echo 1 > subsystems/$nqn/attr_allow_any_host || return 1
    mkdir subsystems/$nqn/namespaces/1 || return 1
    echo -n /dev/loop0 > subsystems/$nqn/namespaces/1/device_path || return 1
    echo 1 > subsystems/$nqn/namespaces/1/enable || return 1
    mkdir ports/1 && echo tcp > ports/1/addr_trtype && echo ipv4 > ports/1/addr_adrfam || return 1
    echo 0.0.0.0 > ports/1/addr_traddr && echo 4420 > ports/1/addr_trsvcid || return 1
    ln -s /sys/kernel/config/nvmet/subsystems/$nqn ports/1/subsystems/$nqn || return 1
    cd /
}
wait_block() {
    for _ in $(seq 100); do [ -b "$1" ] && return 0; sleep 0.1; done
    echo "no $1"; return 1
}
write_pattern() {
    dd if=/kahu/pattern.bin of=$1 bs=4096 seek=$seek4k oflag=direct conv=notrunc && sync
}
read_back() {
    dd if=$1 of=/tmp/back.bin bs=4096 skip=$seek4k count=64 iflag=direct || return 1
    md5sum /kahu/pattern.bin /tmp/back.bin
    cmp /kahu/pattern.bin /tmp/back.bin
}
"""
)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def assert_steps_ok(result: GuestResult, names: list[str]) -> None:
    """Every named step ran and exited 0; otherwise show the whole console."""
    for name in names:
        assert name in result.steps, f"step {name} did not run\n{result.explain()}"
        assert result.rc(name) == 0, f"step {name} failed\n{result.explain()}"


def test_guest_linux_host_to_guest_nvmet() -> None:
    """The harness works: guest nvme-tcp host <-> guest nvmet-tcp over 127.0.0.1, data round-trips."""
    script = (
        NVMET_SETUP
        + f"""
step export nvmet_export {LINUX_NQN}
step discover nvme discover -t tcp -a 127.0.0.1 -s 4420
step connect nvme connect -t tcp -a 127.0.0.1 -s 4420 -n {LINUX_NQN}
step device wait_block /dev/nvme0n1
step write write_pattern /dev/nvme0n1
step read read_back /dev/nvme0n1
step disconnect nvme disconnect -n {LINUX_NQN}
step backing sh -c 'dd if=/tmp/backing.img bs=4096 skip=$seek4k count=64 | md5sum'
"""
    )
    result = run_guest(script, files={"pattern.bin": PATTERN}, timeout=120)
    print(f"guest boot {result.boot_seconds:.1f}s, whole run {result.total_seconds:.1f}s")
    assert result.done, result.explain()
    assert_steps_ok(result, ["export", "discover", "connect", "device", "write", "read", "disconnect"])
    assert f"subnqn:  {LINUX_NQN}" in result.output("discover")
    assert result.output("read").count(md5(PATTERN)) == 2
    assert md5(PATTERN) in result.output("backing")  # the data really went through nvmet to the file
    assert "disconnected 1 controller" in result.output("disconnect")


# ---------------------------------------------------------------- Linux host -> Kahu soft target


@pytest.mark.parametrize("digests", [False, True], ids=["plain", "digests"])
def test_linux_host_to_kahu_soft_target(
    tmp_path: Path, kahu_serve: Callable[[str, int], object], digests: bool
) -> None:
    """Linux's nvme-tcp host discovers, connects, does O_DIRECT I/O and disconnects cleanly.

    With ``digests`` it asks for header and data digests, which it requires ICResp to echo exactly
    and then checks on every PDU.
    """
    digest_flags = " -g -G" if digests else ""
    io_port, disc_port = free_port(), free_port()
    backing = tmp_path / "ns1.img"
    kahu_serve(
        f"""subsystems:
  - nqn: {NQN}
    serial_number: KAHUTEST0001
    allow_any_host: true
    listeners: [{{traddr: 127.0.0.1, trsvcid: "{io_port}"}}]
    namespaces:
      - {{file: {backing}, size: 64MiB, block_size: 512}}
discovery:
  listeners: [{{traddr: 127.0.0.1, trsvcid: "{disc_port}"}}]
""",
        2,  # wait for both listeners to be up
    )
    script = (
        NVMET_SETUP
        + f"""
step discover nvme discover -t tcp -a {HOST_IP} -s {disc_port}
step connect nvme connect -t tcp -a {HOST_IP} -s {io_port} -n {NQN}{digest_flags}
step device wait_block /dev/nvme0n1
step list nvme list
step queues cat /sys/class/nvme/nvme0/queue_count
step idctrl nvme id-ctrl /dev/nvme0
step write write_pattern /dev/nvme0n1
step read read_back /dev/nvme0n1
step disconnect nvme disconnect -n {NQN}
"""
    )
    result = run_guest(script, files={"pattern.bin": PATTERN}, timeout=150)
    print(f"guest boot {result.boot_seconds:.1f}s, whole run {result.total_seconds:.1f}s")
    assert result.done, result.explain()
    steps = ["discover", "connect", "device", "list", "queues", "idctrl", "write", "read", "disconnect"]
    assert_steps_ok(result, steps)
    log = result.output("discover")
    assert f"subnqn:  {NQN}" in log and f"trsvcid: {io_port}" in log, result.explain()
    assert "KAHUTEST0001" in result.output("list")
    assert result.output("queues").strip() == "3", "a 2-CPU guest opens admin + 2 I/O queues"
    assert f"subnqn    : {NQN}" in result.output("idctrl")
    assert result.output("read").count(md5(PATTERN)) == 2
    assert "disconnected 1 controller" in result.output("disconnect")
    offset = PATTERN_SEEK_4K * 4096
    with backing.open("rb") as f:
        f.seek(offset)
        assert f.read(len(PATTERN)) == PATTERN, "backing file lacks the pattern the guest wrote"


# ---------------------------------------------------------------- Kahu host -> Linux nvmet-tcp


async def kahu_host_session(port: int, digests: bool) -> None:
    """Discover, connect, identify, write and read back against the guest's nvmet."""
    entries = await discover("127.0.0.1", port)
    # nvmet listens on 0.0.0.0 and reports the address the host reached it on: the guest's own.
    advertised = {(e.subnqn, e.traddr.strip(), e.trsvcid.strip()) for e in entries}
    assert (LINUX_NQN, GUEST_IP, "4420") in advertised, entries
    ctrl = await Controller.connect(
        traddr="127.0.0.1", trsvcid=port, subnqn=LINUX_NQN, hostnqn=KAHU_HOSTNQN, io_queues=2,
        hdgst=digests, ddgst=digests,
    )
    try:
        assert ctrl.identify.subnqn == LINUX_NQN
        assert ctrl.digests == (digests, digests), "nvmet did not grant the digests asked for"
        assert 1 <= ctrl.identify.cntlid <= 0xFFEF
        ns = ctrl.namespaces[1]
        assert (ns.block_size, ns.num_blocks) == (512, 64 * 1024 * 1024 // 512)
        await ctrl.write(1, PATTERN_SLBA, PATTERN)
        buf = bytearray(len(PATTERN))
        await ctrl.read(1, PATTERN_SLBA, memoryview(buf))
        assert buf == PATTERN, "read back differs from what was written"
    finally:
        await ctrl.close()


@pytest.mark.parametrize("digests", [False, True], ids=["plain", "digests"])
def test_kahu_host_to_linux_nvmet(digests: bool) -> None:
    """The Kahu host discovers Linux nvmet, identifies it, and round-trips data nvmet puts on disk."""
    blocks = len(PATTERN) // 512
    script = (
        NVMET_SETUP
        + f"""
step export nvmet_export {LINUX_NQN}
marker nvmet-ready
wait_host done
step kernel-log sh -c 'dmesg | grep nvmet'
step backing sh -c 'dd if=/tmp/backing.img bs=512 skip={PATTERN_SLBA} count={blocks} | md5sum'
"""
    )
    with Guest(script, forward=(4420,)) as guest:
        guest.expect("KAHU-MARK nvmet-ready", timeout=90)
        try:
            asyncio.run(asyncio.wait_for(kahu_host_session(guest.host_port(4420), digests), timeout=60))
        except Exception as e:  # nvmet says why it refused something only in its kernel log
            guest.send_line("go")
            e.add_note("guest kernel log:\n" + guest.wait(timeout=30).output("kernel-log"))
            raise
        guest.expect("KAHU-WAIT done", timeout=10)
        guest.send_line("go")
        result = guest.wait(timeout=60)
    print(f"guest boot {result.boot_seconds:.1f}s, whole run {result.total_seconds:.1f}s")
    assert result.done, result.explain()
    assert_steps_ok(result, ["export", "kernel-log", "backing"])
    assert f"for NQN {KAHU_HOSTNQN}" in result.output("kernel-log")  # nvmet saw our host NQN
    assert md5(PATTERN) in result.output("backing")  # the write reached nvmet's backing file
