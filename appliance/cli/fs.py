"""``kahu fs create|list|delete``: file systems and the capacity provisioned to them."""

from __future__ import annotations

import argparse
import json

from ..cluster.schema import ClusterError
from ..units import human_size, parse_size
from .context import add_cluster_arguments, table, with_store


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("fs", help="file systems")
    sub = parser.add_subparsers(dest="fs_command", required=True, metavar="ACTION")

    create = sub.add_parser("create", help="create a file system with a capacity")
    create.add_argument("name")
    create.add_argument("--capacity", required=True, help="e.g. 100GiB; must fit the usable capacity")
    add_cluster_arguments(create)
    create.set_defaults(func=create_fs)

    listing = sub.add_parser("list", help="file systems")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_cluster_arguments(listing)
    listing.set_defaults(func=list_fs)

    delete = sub.add_parser("delete", help="delete a file system")
    delete.add_argument("name")
    add_cluster_arguments(delete)
    delete.set_defaults(func=delete_fs)


def create_fs(args: argparse.Namespace) -> int:
    capacity = parse_size(args.capacity, "--capacity", ClusterError)
    fs = with_store(args, lambda store: store.create_fs(args.name, capacity))
    print(f"file system {fs.name} created ({human_size(fs.capacity)})")
    return 0


def list_fs(args: argparse.Namespace) -> int:
    config = with_store(args, lambda store: store.require())
    rows = [{"name": fs.name, "id": fs.id, "capacity": fs.capacity}
            for fs in sorted(config.filesystems.values(), key=lambda f: f.name)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(["NAME", "ID", "CAPACITY"],
                    [[r["name"], r["id"], human_size(r["capacity"])] for r in rows]))
    return 0


def delete_fs(args: argparse.Namespace) -> int:
    with_store(args, lambda store: store.delete_fs(args.name))
    print(f"file system {args.name} deleted")
    return 0
