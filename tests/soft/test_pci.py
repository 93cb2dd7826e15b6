"""Hugepages and vfio-pci binding plans, against a fake sysfs tree and fabricated mountinfo files."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import yaml

from appliance.cli import main as cli_main
from appliance.spdk_rpc.pci import (
    HUGEPAGES_2M,
    PciError,
    apply,
    block_devices,
    current_driver,
    mounted_devices,
    plan_bind,
    plan_hugepages,
    plan_unbind,
)

ADDR = "0000:0a:00.0"
NS_DEV, PART_DEV, DM_DEV = "259:0", "259:1", "254:0"


def fake_sysfs(
    root: Path, driver: str | None = "nvme", multipath: bool = False, pci_class: str = "0x010802"
) -> Path:
    """A sysfs with one NVMe function at ADDR: namespace nvme0n1 with partition nvme0n1p1."""
    drivers = root / "bus/pci/drivers"
    for name in ("nvme", "vfio-pci"):
        (drivers / name).mkdir(parents=True)
        (drivers / name / "unbind").write_text("")
    (root / "bus/pci/drivers_probe").write_text("")
    dev = root / "bus/pci/devices" / ADDR
    dev.mkdir(parents=True)
    (dev / "class").write_text(pci_class + "\n")
    (dev / "driver_override").write_text("(null)\n")
    if driver:
        (dev / "driver").symlink_to(drivers / driver)
    ctrl = dev / "nvme/nvme0"
    if multipath:  # the controller holds only the hidden path; the disk is the head in /sys/block
        (ctrl / "nvme0c0n1").mkdir(parents=True)
        disk = root / "block/nvme0n1"
        (disk / "multipath/nvme0c0n1").mkdir(parents=True)
    else:
        disk = ctrl / "nvme0n1"
    _block(disk, NS_DEV)
    _block(disk / "nvme0n1p1", PART_DEV)
    (disk / "nvme0n1p1/partition").write_text("1\n")
    hugepages = root / HUGEPAGES_2M
    hugepages.parent.mkdir(parents=True)
    hugepages.write_text("0\n")
    return root


def _block(path: Path, dev: str) -> None:
    (path / "holders").mkdir(parents=True)
    (path / "dev").write_text(dev + "\n")


def mountinfo(tmp_path: Path, *devs: str) -> Path:
    """A mountinfo with the root file system plus one mount per ``major:minor``."""
    lines = ["22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw"]
    for i, dev in enumerate(devs):
        lines.append(f"{40 + i} 22 {dev} / /mnt/data\\040{i} rw,relatime shared:9 - xfs /dev/x rw")
    path = tmp_path / "mountinfo"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bind_plan_moves_the_function_to_vfio(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path / "sys")
    plan = plan_bind(ADDR, sysfs, mountinfo(tmp_path))
    dev = sysfs / "bus/pci/devices" / ADDR
    assert [(s.path, s.value) for s in plan] == [
        (dev / "driver_override", "vfio-pci"),
        (dev / "driver/unbind", ADDR),
        (sysfs / "bus/pci/drivers_probe", ADDR),
    ]
    apply(plan, dry_run=False)
    assert (dev / "driver_override").read_text() == "vfio-pci"
    assert (sysfs / "bus/pci/drivers/nvme/unbind").read_text() == ADDR
    assert (sysfs / "bus/pci/drivers_probe").read_text() == ADDR


def test_dry_run_prints_every_step_and_writes_nothing(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path / "sys")
    plan = plan_bind(ADDR, sysfs, mountinfo(tmp_path))
    out = io.StringIO()
    apply(plan, dry_run=True, out=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith(f"echo vfio-pci > {sysfs}/bus/pci/devices/{ADDR}/driver_override")
    assert "unbind from nvme" in lines[1]
    assert (sysfs / "bus/pci/devices" / ADDR / "driver_override").read_text() == "(null)\n"
    assert (sysfs / "bus/pci/drivers/nvme/unbind").read_text() == ""


def test_bind_is_idempotent_and_unbind_gives_it_back(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path / "sys", driver="vfio-pci")
    assert current_driver(ADDR, sysfs) == "vfio-pci"
    assert plan_bind(ADDR, sysfs, mountinfo(tmp_path)) == []
    back = plan_unbind(ADDR, sysfs)
    assert [(s.path.name, s.value) for s in back] == [
        ("driver_override", "\n"), ("unbind", ADDR), ("drivers_probe", ADDR)]
    apply(back, dry_run=False)
    assert (sysfs / "bus/pci/drivers/vfio-pci/unbind").read_text() == ADDR


def test_unbound_function_needs_no_unbind(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path / "sys", driver=None)
    plan = plan_bind(ADDR, sysfs, mountinfo(tmp_path))
    assert [s.path.name for s in plan] == ["driver_override", "drivers_probe"]
    assert plan_unbind(ADDR, sysfs) == []


@pytest.mark.parametrize("multipath", [False, True])
def test_block_devices_of_a_function(tmp_path: Path, multipath: bool) -> None:
    sysfs = fake_sysfs(tmp_path / "sys", multipath=multipath)
    found = {(b.name, b.dev) for b in block_devices(ADDR, sysfs)}
    assert found == {("nvme0n1", NS_DEV), ("nvme0n1p1", PART_DEV)}


@pytest.mark.parametrize(("multipath", "mounted"), [(False, NS_DEV), (False, PART_DEV), (True, PART_DEV)])
def test_refuses_a_function_with_a_mounted_file_system(tmp_path: Path, multipath: bool, mounted: str) -> None:
    sysfs = fake_sysfs(tmp_path / "sys", multipath=multipath)
    expected = rf"refusing to unbind: /dev/nvme0n1\S* \({mounted}\) is mounted on /mnt/data 0"
    with pytest.raises(PciError, match=expected):
        plan_bind(ADDR, sysfs, mountinfo(tmp_path, mounted))


def test_refuses_when_a_holder_on_the_drive_is_mounted(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path / "sys")
    (sysfs / "bus/pci/devices" / ADDR / "nvme/nvme0/nvme0n1/nvme0n1p1/holders/dm-0").mkdir()
    _block(sysfs / "class/block/dm-0", DM_DEV)
    with pytest.raises(PciError, match=r"/dev/dm-0 \(254:0\) is mounted"):
        plan_bind(ADDR, sysfs, mountinfo(tmp_path, DM_DEV))
    assert plan_bind(ADDR, sysfs, mountinfo(tmp_path, "8:1"))  # other devices mounted: fine


@pytest.mark.parametrize(
    ("addr", "setup", "message"),
    [
        ("0a:00.0", {}, "not a PCI address"),
        ("0000:0b:00.0", {}, "no such PCI device"),
        (ADDR, {"pci_class": "0x020000"}, r"not an NVMe controller \(PCI class 0x020000\)"),
    ],
)
def test_bad_functions_are_refused(tmp_path: Path, addr: str, setup: dict[str, str], message: str) -> None:
    sysfs = fake_sysfs(tmp_path / "sys", **setup)
    with pytest.raises(PciError, match=message):
        plan_bind(addr, sysfs, mountinfo(tmp_path))


def test_vfio_driver_must_be_loaded(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path / "sys")
    (sysfs / "bus/pci/drivers/vfio-pci/unbind").unlink()
    (sysfs / "bus/pci/drivers/vfio-pci").rmdir()
    with pytest.raises(PciError, match=r"modprobe vfio-pci"):
        plan_bind(ADDR, sysfs, mountinfo(tmp_path))


def test_hugepages_are_raised_never_lowered(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path / "sys")
    (step,) = plan_hugepages(512, sysfs)
    assert (step.path, step.value) == (sysfs / HUGEPAGES_2M, "512")
    apply([step], dry_run=False)
    assert (sysfs / HUGEPAGES_2M).read_text() == "512"
    assert plan_hugepages(512, sysfs) == [] and plan_hugepages(256, sysfs) == []
    assert plan_hugepages(0, tmp_path / "nothing-here") == []
    with pytest.raises(PciError, match="no 2 MiB hugepage support"):
        plan_hugepages(8, tmp_path / "nothing-here")


def test_real_mountinfo_has_the_root_file_system() -> None:
    st = os.stat("/")
    mounts = mounted_devices()
    assert mounts[f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"].startswith("/")


def test_cli_prepare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sysfs = fake_sysfs(tmp_path / "sys")
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({
        "name": "node1", "allow_any_host": True, "data_addresses": [{"address": "10.77.0.11"}],
        "drives": [{"pci": ADDR}, {"malloc": "64MiB"}], "spdk": {"hugepages": 1024},
    }))
    argv = ["node", "prepare", "--config", str(config), "--sysfs-root", str(sysfs)]

    assert cli_main.main([*argv, "--mountinfo", str(mountinfo(tmp_path)), "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(": echo ")[1] for line in printed] == [
        f"1024 > {sysfs}/{HUGEPAGES_2M}",
        f"vfio-pci > {sysfs}/bus/pci/devices/{ADDR}/driver_override",
        f"{ADDR} > {sysfs}/bus/pci/devices/{ADDR}/driver/unbind",
        f"{ADDR} > {sysfs}/bus/pci/drivers_probe",
    ]
    assert (sysfs / HUGEPAGES_2M).read_text() == "0\n"

    assert cli_main.main([*argv, "--mountinfo", str(mountinfo(tmp_path, PART_DEV))]) == 1
    assert "refusing to unbind: /dev/nvme0n1p1" in capsys.readouterr().err
    assert (sysfs / HUGEPAGES_2M).read_text() == "0\n"  # planning failed, so nothing was written

    assert cli_main.main([*argv, "--mountinfo", str(mountinfo(tmp_path))]) == 0
    assert (sysfs / HUGEPAGES_2M).read_text() == "1024"
    assert (sysfs / "bus/pci/devices" / ADDR / "driver_override").read_text() == "vfio-pci"
