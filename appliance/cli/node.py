"""``kahu node ...``: cluster membership (add, list, remove), running a node's backend (serve), and this
machine's node configuration file, NVMe drives and preparation for SPDK."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from ..backend.node import NodeBackend, NodeRemoved
from ..cluster.schema import Node
from ..home import etcd_endpoints
from ..nvmeof.spec import DISCOVERY_PORT, NVME_PORT
from ..procs import notify
from ..spdk_rpc.drives import NvmeCli
from ..spdk_rpc.lifecycle import DEFAULT_STATE_DIR, NodeTarget
from ..spdk_rpc.nodeconfig import DriveKind, NodeConfig, NodeConfigError, load_node_config
from ..spdk_rpc.pci import MOUNTINFO, PciError, Step, apply, hugepages_reserved, plan_bind, plan_hugepages
from ..spdk_rpc.rpc import RpcError
from ..tasks import first_completed, stop_on_signals
from .context import add_cluster_arguments, home_of, with_store
from .views import config_and_observed, node_row, nodes_table


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

    target = sub.add_parser("target", help="run a drive target alone, from a node configuration file")
    target.add_argument("--config", type=Path, help="node configuration file (default: one-machine default)")
    target.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="where drive files, logs and runtime files live (default: ./.kahu)")
    target.set_defaults(func=run_target)

    add = sub.add_parser("add", help="add a node to the cluster")
    add.add_argument("name")
    add.add_argument("--address", required=True, help="the address its drive target listens on")
    add.add_argument("--failure-domain", default="", help="e.g. its rack (default: the node itself)")
    add.add_argument("--port", type=int, default=NVME_PORT, help=f"NVMe/TCP port (default {NVME_PORT})")
    add.add_argument("--discovery-port", type=int, default=DISCOVERY_PORT,
                     help=f"discovery port (default {DISCOVERY_PORT})")
    add_cluster_arguments(add)
    add.set_defaults(func=add_node)

    listing = sub.add_parser("list", help="the cluster's nodes and their health")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_cluster_arguments(listing)
    listing.set_defaults(func=list_nodes)

    remove = sub.add_parser("remove", help="remove a node (must be down) and retire its drives")
    remove.add_argument("name")
    remove.add_argument("--force", action="store_true", help="remove it even while it is up")
    add_cluster_arguments(remove)
    remove.set_defaults(func=remove_node)

    serve = sub.add_parser("serve", help="run a node's backend: its drive target, heartbeat and duties")
    serve.add_argument("name")
    serve.add_argument("--soft", action="store_true", help="use the soft target even where SPDK is installed")
    serve.add_argument("--notify-fd", type=int, help=argparse.SUPPRESS)
    add_cluster_arguments(serve)
    serve.set_defaults(func=serve_node)


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


def add_node(args: argparse.Namespace) -> int:
    node = Node(args.name, args.address, args.failure_domain, args.port, args.discovery_port)
    with_store(args, lambda store: store.add_node(node))
    print(f"node {node.name} added ({node.address}, failure domain {node.domain})")
    return 0


def list_nodes(args: argparse.Namespace) -> int:
    config, observed = with_store(args, config_and_observed)
    rows = [node_row(n, config, observed) for n in sorted(config.nodes.values(), key=lambda n: n.name)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(nodes_table(rows))
    return 0


def remove_node(args: argparse.Namespace) -> int:
    removed = with_store(args, lambda store: store.remove_node(args.name, args.force))
    drives = f"; drives {', '.join(str(d.id) for d in removed)} removed with it" if removed else ""
    print(f"node {args.name} removed{drives}")
    return 0


def serve_node(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s")
    home = home_of(args) / "nodes" / args.name
    backend = NodeBackend(etcd_endpoints(args.etcd, home_of(args)), args.name, home,
                          soft=True if args.soft else None, ready=lambda: notify(args.notify_fd, "READY"))

    async def main() -> None:
        await backend.run(stop_on_signals())

    try:
        asyncio.run(main())
    except NodeRemoved as e:
        print(f"kahu node serve: {e}; stopping", file=sys.stderr)
    return 0


def run_target(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_node_config(args.config) if args.config else NodeConfig.default(args.state_dir)
    try:
        asyncio.run(_run_target(config, args.state_dir))
    except RpcError as e:
        print(f"kahu node target: {e}", file=sys.stderr)
        return 1
    return 0


async def _run_target(config: NodeConfig, state_dir: Path) -> None:
    stop = stop_on_signals()
    async with NodeTarget(config, state_dir) as nt:
        version = await asyncio.to_thread(nt.rpc.spdk_get_version)
        subsystems = await asyncio.to_thread(nt.rpc.nvmf_get_subsystems)
        print(f"drive target: {version['version']} (pid {nt.process.pid}, rpc {config.spdk.rpc_socket})")
        print(describe(subsystems), flush=True)
        await first_completed(nt.wait(), stop.wait())  # nt.wait raises when supervision gave up
    print("stopped", flush=True)


def describe(subsystems: list[dict[str, Any]]) -> str:
    """What the target exports, as it reports it: subsystems, listeners, namespaces, allowed hosts."""
    lines = []
    for sub in subsystems:
        lines.append(f"{sub['subtype'].lower()} subsystem {sub['nqn']}")
        lines += [f"  listening {a['trtype']} {a['traddr']}:{a['trsvcid']}" for a in sub["listen_addresses"]]
        lines += [f"  namespace {ns['nsid']}: bdev {ns['bdev_name']} uuid {ns.get('uuid', '-')}"
                  for ns in sub.get("namespaces", [])]
        if sub["subtype"] != "Discovery":
            hosts = "any host" if sub["allow_any_host"] else ", ".join(h["nqn"] for h in sub["hosts"])
            lines.append(f"  allowed hosts: {hosts or 'none'}")
    return "\n".join(lines)
