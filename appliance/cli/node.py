"""``kahu node ...``: this node's configuration file, its NVMe drives, and preparing it for SPDK."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml

from ..spdk_rpc.drives import NvmeCli
from ..spdk_rpc.lifecycle import DEFAULT_STATE_DIR
from ..spdk_rpc.nodeconfig import DriveKind, NodeConfig, NodeConfigError, load_node_config
from ..spdk_rpc.pci import MOUNTINFO, PciError, Step, apply, hugepages_reserved, plan_bind, plan_hugepages


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("node", help="this node: configuration, drives, hugepages and PCI binding")
    sub = parser.add_subparsers(dest="node_command", required=True, metavar="ACTION")

    check = sub.add_parser("check-config", help="validate a node configuration file, print it normalised")
    check.add_argument("file", type=Path)
    check.set_defaults(func=check_config)

    drives = sub.add_parser("drives", help="list the NVMe namespaces the kernel sees (nvme list)")
    drives.add_argument("--json", action="store_true", help="print JSON instead of a table")
    drives.set_defaults(func=list_drives)

    prepare = sub.add_parser("prepare", help="reserve hugepages and bind PCI drives to vfio-pci for SPDK")
    prepare.add_argument("--dry-run", action="store_true", help="print the sysfs writes, do not write")
    prepare.add_argument("--config", type=Path, help="node configuration file (default: one-machine default)")
    prepare.add_argument("--sysfs-root", type=Path, default=Path("/sys"), help=argparse.SUPPRESS)
    prepare.add_argument("--mountinfo", type=Path, default=Path(MOUNTINFO), help=argparse.SUPPRESS)
    prepare.set_defaults(func=prepare_node)


def check_config(args: argparse.Namespace) -> int:
    try:
        config = load_node_config(args.file)
    except NodeConfigError as e:
        print(f"{args.file}: {e}", file=sys.stderr)
        return 1
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


def list_drives(args: argparse.Namespace) -> int:
    namespaces = NvmeCli().list_namespaces()
    if args.json:
        print(json.dumps([dataclasses.asdict(ns) for ns in namespaces], indent=2))
        return 0
    if not namespaces:
        print("no NVMe namespaces")
        return 0
    row = "{:<16} {:>5} {:>14} {:>6}  {:<40} {:<20} {}"
    print(row.format("DEVICE", "NSID", "BYTES", "SECTOR", "MODEL", "SERIAL", "FIRMWARE"))
    for ns in namespaces:
        print(row.format(ns.device_path, ns.nsid, ns.physical_size, ns.sector_size,
                         ns.model_number or "-", ns.serial_number or "-", ns.firmware or "-"))
    return 0


def prepare_node(args: argparse.Namespace) -> int:
    config = load_node_config(args.config) if args.config else NodeConfig.default(DEFAULT_STATE_DIR)
    plan = preparation_plan(config, args.sysfs_root, args.mountinfo)
    if not plan:
        print("nothing to do: hugepages reserved and PCI drives bound as configured")
        return 0
    apply(plan, dry_run=args.dry_run)
    wanted = config.spdk.hugepages
    if not args.dry_run and wanted and (got := hugepages_reserved(args.sysfs_root)) < wanted:
        raise PciError(f"spdk.hugepages: asked for {wanted} 2 MiB pages, the kernel reserved only {got}")
    return 0


def preparation_plan(config: NodeConfig, sysfs_root: Path, mountinfo: Path) -> list[Step]:
    """Hugepages first, then each PCI drive's binding (none when SPDK runs without PCI)."""
    plan = plan_hugepages(config.spdk.hugepages, sysfs_root)
    if not config.spdk.no_pci:
        for drive in config.drives:
            if drive.kind is DriveKind.PCI and drive.source:
                plan += plan_bind(drive.source, sysfs_root, mountinfo)
    return plan
