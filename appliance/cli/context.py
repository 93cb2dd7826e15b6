"""What every cluster command shares: finding etcd, opening the store, printing tables."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from ..cluster.etcd import Etcd
from ..cluster.store import ClusterStore
from ..home import default_home, etcd_endpoints

T = TypeVar("T")
CLI_TIMEOUT = 5.0  # a command against an unreachable cluster fails within this


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--etcd", metavar="URLS",
                        help="etcd client URLs, comma-separated (default: $KAHU_ETCD, else the cluster "
                             "`kahu up` runs, else http://127.0.0.1:2379)")
    parser.add_argument("--home", type=Path, default=None,
                        help="Kahu's directory on this machine (default: $KAHU_HOME, /var/lib/kahu as root)")


def home_of(args: argparse.Namespace) -> Path:
    return args.home if getattr(args, "home", None) else default_home()


def with_store(args: argparse.Namespace, action: Callable[[ClusterStore], Awaitable[T]]) -> T:
    """Run ``action(store)`` against the cluster the arguments point at, bounded in time."""
    endpoints = etcd_endpoints(getattr(args, "etcd", None), home_of(args))

    async def main() -> T:
        async with Etcd(endpoints, timeout=CLI_TIMEOUT) as etcd:
            return await action(ClusterStore(etcd))

    return asyncio.run(main())


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain text table, columns as wide as their widest cell."""
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)
