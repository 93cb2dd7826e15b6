"""The ``kahu`` command line: one sub-command group per module, each registering its own parsers."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..cluster.etcd import EtcdError

# Modules under appliance.cli that each define ``register(subparsers)``.
GROUPS = ("up", "status", "cluster", "node", "drive", "fs", "target", "nvme")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kahu", description="Kahu distributed file system appliance")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in GROUPS:
        importlib.import_module(f"appliance.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, EtcdError) as e:
        print(f"kahu: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
