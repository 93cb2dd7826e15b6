"""Hugepages and vfio-pci binding for SPDK, as plans of sysfs writes that can be shown before doing them.

SPDK needs 2 MiB hugepages and its NVMe drives unbound from the kernel ``nvme`` driver and bound to
``vfio-pci``. Both are plain writes to sysfs files, and both can destroy data when aimed at the wrong
device (unbinding a drive under a mounted file system). So every change is first computed as a list
of ``Step`` (a description and the one write it does), printed by ``kahu node prepare --dry-run``,
and only then applied. Planning refuses a PCI function whose namespaces, partitions or their holders
(device-mapper, md) are mounted. ``sysfs_root`` and ``mountinfo`` are parameters because sysfs is just
files: tests build a fake tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

HUGEPAGES_2M = "kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
NVME_CLASS_PREFIX = "0x0108"  # PCI class 01 (mass storage), subclass 08 (non-volatile memory)
VFIO_DRIVER = "vfio-pci"
MOUNTINFO = "/proc/self/mountinfo"
PCI_ADDRESS_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_PATH_NS_RE = re.compile(r"^nvme\d+c\d+n\d+$")  # a multipath path device; its head lives in /sys/block


class PciError(OSError):
    """A PCI or hugepage change cannot be planned or applied safely."""


@dataclass(frozen=True)
class Step:
    """One sysfs write: ``value`` into ``path``."""

    description: str
    path: Path
    value: str

    def __str__(self) -> str:
        shown = self.value.strip() or "''"
        return f"{self.description}: echo {shown} > {self.path}"


@dataclass(frozen=True)
class BlockDevice:
    name: str  # nvme0n1, nvme0n1p1, dm-0
    dev: str  # "major:minor"


def plan_hugepages(count: int, sysfs_root: str | Path = "/sys") -> list[Step]:
    """Reserve at least ``count`` 2 MiB hugepages; never lowers a larger reservation."""
    if count < 0:
        raise PciError(f"hugepages: must not be negative, got {count}")
    path = Path(sysfs_root) / HUGEPAGES_2M
    if count == 0:
        return []
    current = _read_int(path)
    if current >= count:
        return []
    return [Step(f"reserve {count} 2 MiB hugepages (now {current})", path, str(count))]


def hugepages_reserved(sysfs_root: str | Path = "/sys") -> int:
    """How many 2 MiB hugepages the kernel actually reserved (it may give fewer than asked)."""
    return _read_int(Path(sysfs_root) / HUGEPAGES_2M)


def plan_bind(
    pci_addr: str, sysfs_root: str | Path = "/sys", mountinfo: str | Path = MOUNTINFO
) -> list[Step]:
    """Steps that move an NVMe PCI function to vfio-pci; empty when it is already bound there."""
    dev = _nvme_function(pci_addr, sysfs_root)
    current = current_driver(pci_addr, sysfs_root)
    if current == VFIO_DRIVER:
        return []
    if not (Path(sysfs_root) / "bus/pci/drivers" / VFIO_DRIVER).is_dir():
        raise PciError(f"{pci_addr}: the vfio-pci driver is not loaded (modprobe vfio-pci)")
    _refuse_if_mounted(pci_addr, sysfs_root, mountinfo)
    steps = [Step(f"{pci_addr}: let only {VFIO_DRIVER} claim it", dev / "driver_override", VFIO_DRIVER)]
    if current is not None:
        steps.append(Step(f"{pci_addr}: unbind from {current}", dev / "driver/unbind", pci_addr))
    steps.append(_probe(pci_addr, sysfs_root, VFIO_DRIVER))
    return steps


def plan_unbind(pci_addr: str, sysfs_root: str | Path = "/sys") -> list[Step]:
    """Steps that give a function back to its kernel driver; empty when vfio-pci does not hold it."""
    dev = _nvme_function(pci_addr, sysfs_root)
    if current_driver(pci_addr, sysfs_root) != VFIO_DRIVER:
        return []
    return [
        Step(f"{pci_addr}: clear the driver override", dev / "driver_override", "\n"),
        Step(f"{pci_addr}: unbind from {VFIO_DRIVER}", dev / "driver/unbind", pci_addr),
        _probe(pci_addr, sysfs_root, "its default driver"),
    ]


def current_driver(pci_addr: str, sysfs_root: str | Path = "/sys") -> str | None:
    link = Path(sysfs_root) / "bus/pci/devices" / pci_addr / "driver"
    return link.resolve().name if link.exists() else None


def apply(plan: list[Step], dry_run: bool = True, out: TextIO | None = None) -> None:
    """Do each step's write, or with ``dry_run`` only print it (to ``out``, default stdout)."""
    for step in plan:
        if dry_run:
            print(step, file=out)
            continue
        try:
            with open(step.path, "w") as f:
                f.write(step.value)
        except OSError as e:
            raise PciError(f"{step.description}: writing {step.path} failed: {e.strerror}") from e


def block_devices(pci_addr: str, sysfs_root: str | Path = "/sys") -> list[BlockDevice]:
    """Namespaces of the function's controllers, their partitions and holders (dm, md)."""
    root = Path(sysfs_root)
    dev = _device_dir(pci_addr, sysfs_root)
    disks: list[Path] = []
    for ns in sorted(dev.glob("nvme/nvme*/nvme*n*")):
        if _PATH_NS_RE.match(ns.name):  # native multipath: the mountable disk is the head
            disks.extend(sorted(p.parent.parent for p in root.glob(f"block/*/multipath/{ns.name}")))
        else:
            disks.append(ns)
    found: dict[str, BlockDevice] = {}
    for disk in disks:
        for part in [disk, *sorted(p.parent for p in disk.glob("*/partition"))]:
            _collect(part, root, found)
    return list(found.values())


def _collect(node: Path, root: Path, found: dict[str, BlockDevice]) -> None:
    """Add ``node`` (a sysfs block device directory) and, recursively, whatever holds it."""
    if node.name in found or not (node / "dev").is_file():
        return
    found[node.name] = BlockDevice(node.name, (node / "dev").read_text().strip())
    for holder in sorted((node / "holders").glob("*")):
        _collect(root / "class/block" / holder.name, root, found)


def mounted_devices(mountinfo: str | Path = MOUNTINFO) -> dict[str, str]:
    """``major:minor`` -> mount point for every mount in a mountinfo file."""
    mounts: dict[str, str] = {}
    for line in Path(mountinfo).read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5:
            mounts.setdefault(fields[2], fields[4].replace("\\040", " "))
    return mounts


def _refuse_if_mounted(pci_addr: str, sysfs_root: str | Path, mountinfo: str | Path) -> None:
    mounts = mounted_devices(mountinfo)
    for bdev in block_devices(pci_addr, sysfs_root):
        if bdev.dev in mounts:
            raise PciError(
                f"{pci_addr}: refusing to unbind: /dev/{bdev.name} ({bdev.dev}) "
                f"is mounted on {mounts[bdev.dev]}"
            )


def _probe(pci_addr: str, sysfs_root: str | Path, driver: str) -> Step:
    probe = Path(sysfs_root) / "bus/pci/drivers_probe"
    return Step(f"{pci_addr}: probe, so {driver} binds it", probe, pci_addr)


def _device_dir(pci_addr: str, sysfs_root: str | Path) -> Path:
    if not PCI_ADDRESS_RE.match(pci_addr):
        raise PciError(f"{pci_addr!r}: not a PCI address like 0000:0a:00.0")
    dev = Path(sysfs_root) / "bus/pci/devices" / pci_addr
    if not dev.is_dir():
        raise PciError(f"{pci_addr}: no such PCI device")
    return dev


def _nvme_function(pci_addr: str, sysfs_root: str | Path) -> Path:
    dev = _device_dir(pci_addr, sysfs_root)
    pci_class = (dev / "class").read_text().strip()
    if not pci_class.startswith(NVME_CLASS_PREFIX):
        raise PciError(f"{pci_addr}: not an NVMe controller (PCI class {pci_class})")
    return dev


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except FileNotFoundError:
        raise PciError(f"{path}: missing (no 2 MiB hugepage support?)") from None
    except ValueError:
        raise PciError(f"{path}: does not hold a number") from None
