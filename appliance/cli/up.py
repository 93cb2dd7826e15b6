"""``kahu up``: start this node's drive target, export the node's drives, keep it running until stopped."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from ..spdk_rpc.lifecycle import DEFAULT_STATE_DIR, NodeTarget
from ..spdk_rpc.nodeconfig import NodeConfig, load_node_config
from ..spdk_rpc.rpc import RpcError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("up", help="start this node's drive target and export its drives")
    parser.add_argument("--config", type=Path, help="node configuration file (default: one-machine default)")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="where drive files, logs and runtime files live (default: ./.kahu)")
    parser.set_defaults(func=up)


def up(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_node_config(args.config) if args.config else NodeConfig.default(args.state_dir)
    try:
        asyncio.run(_run(config, args.state_dir))
    except RpcError as e:
        print(f"kahu up: {e}", file=sys.stderr)
        return 1
    return 0


async def _run(config: NodeConfig, state_dir: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with NodeTarget(config, state_dir) as nt:
        version = await asyncio.to_thread(nt.rpc.spdk_get_version)
        subsystems = await asyncio.to_thread(nt.rpc.nvmf_get_subsystems)
        print(f"drive target: {version['version']} (pid {nt.process.pid}, rpc {config.spdk.rpc_socket})")
        print(describe(subsystems), flush=True)
        supervised = asyncio.create_task(nt.wait())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([supervised, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (supervised, stopped):
                task.cancel()
            await asyncio.gather(supervised, stopped, return_exceptions=True)
        if not supervised.cancelled():
            supervised.result()  # supervision gave up: say why
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
