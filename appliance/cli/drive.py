"""``kahu drive add|list|remove``: the cluster's drives, as configured and as their targets report them."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..cluster.schema import ClusterError, DriveState
from ..spdk_rpc.pci import PCI_ADDRESS_RE
from ..units import human_size
from .context import add_cluster_arguments, table, with_store
from .views import config_and_observed, drive_row


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("drive", help="the cluster's drives")
    sub = parser.add_subparsers(dest="drive_command", required=True, metavar="ACTION")

    add = sub.add_parser("add", help="add a drive to a node (exported by that node's target at once)")
    add.add_argument("node")
    add.add_argument("source", help="a PCI address (0000:0a:00.0), a block device (/dev/...) or a file")
    add.add_argument("--size", help="for a file drive: its size, e.g. 1GiB (created sparse if missing)")
    add.add_argument("--block-size", type=int, choices=(512, 4096), help="logical block size")
    add_cluster_arguments(add)
    add.set_defaults(func=add_drive)

    listing = sub.add_parser("list", help="drives, their state and what their node's target exports")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.add_argument("--all", action="store_true", help="include removed drives")
    add_cluster_arguments(listing)
    listing.set_defaults(func=list_drives)

    remove = sub.add_parser("remove", help="drain a drive, then remove it from the cluster")
    remove.add_argument("id", type=int)
    add_cluster_arguments(remove)
    remove.set_defaults(func=remove_drive)


def drive_spec(source: str, size: str | None, block_size: int | None) -> dict[str, Any]:
    """The node-config form of a drive named on the command line; checked when it is added."""
    if PCI_ADDRESS_RE.match(source.lower()):
        spec: dict[str, Any] = {"pci": source}
    elif source.startswith("/dev/"):
        spec = {"block_device": source}
    else:
        if not source.startswith("/"):
            raise ClusterError(f"drive {source!r}: a file drive needs an absolute path on its node")
        if size is None:
            raise ClusterError(f"drive {source}: a file drive needs --size")
        spec = {"file": source}
    if size is not None:
        if "file" not in spec:
            raise ClusterError("--size: only a file drive takes a size; devices have their own")
        spec["size"] = size
    if block_size is not None:
        spec["block_size"] = block_size
    return spec


def add_drive(args: argparse.Namespace) -> int:
    spec = drive_spec(args.source, args.size, args.block_size)
    drive = with_store(args, lambda store: store.add_drive(args.node, spec))
    print(f"drive {drive.id} added to node {drive.node}")
    return 0


def list_drives(args: argparse.Namespace) -> int:
    config, observed = with_store(args, config_and_observed)
    drives = sorted(config.drives.values(), key=lambda d: d.id)
    rows = [drive_row(d, observed) for d in drives if args.all or d.state is not DriveState.REMOVED]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(table(["ID", "NODE", "KIND", "SOURCE", "SIZE", "STATE", "EXPORTED"],
                [[r["id"], r["node"], r["kind"], r["source"], human_size(r["size"]) if r["size"] else "?",
                  r["state"], "yes" if r["exported"] else f"no {r['error']}".strip()] for r in rows]))
    return 0


def remove_drive(args: argparse.Namespace) -> int:
    drive = with_store(args, lambda store: store.set_drive_state(args.id, DriveState.DRAINING,
                                                                 "kahu drive remove"))
    print(f"drive {drive.id} on {drive.node} is draining; it is removed once its data has moved")
    return 0
