"""``kahu target serve CONFIG``: run the soft NVMe/TCP target until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging

try:  # about twice the IOPS of the default loop; serving works without it
    from uvloop import run as run_loop
except ImportError:
    from asyncio import run as run_loop

from ..nvmeof.target.config import TargetConfig, apply_target_config, load_target_config
from ..nvmeof.target.server import TargetServer
from ..tasks import stop_on_signals


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("target", help="the soft NVMe/TCP target")
    commands = parser.add_subparsers(dest="target_command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve the subsystems of a YAML config until stopped")
    serve.add_argument("config", help="YAML file: transport, discovery, subsystems, rpc_socket")
    serve.add_argument("-v", "--verbose", action="store_true", help="log every controller and connection")
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    cfg = load_target_config(args.config)
    return run_loop(serve(cfg))


async def serve(cfg: TargetConfig) -> int:
    """Apply ``cfg``, announce every listener on stdout, then wait for a stop signal."""
    stop = stop_on_signals()
    async with TargetServer() as server:
        await apply_target_config(server, cfg)
        rpc = None
        if cfg.rpc_socket:
            from ..nvmeof.target.rpc import RpcServer  # written separately; only needed with rpc_socket

            rpc = RpcServer(server, cfg.rpc_socket)
            await rpc.start()
        try:
            for host, port in server.bound_addresses():
                print(f"listening tcp {host}:{port}", flush=True)
            if rpc is not None:
                print(f"listening rpc {cfg.rpc_socket}", flush=True)
            await stop.wait()
        finally:
            if rpc is not None:
                await rpc.stop()
    return 0
