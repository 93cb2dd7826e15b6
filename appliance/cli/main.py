"""The ``kahu`` command line: one sub-command group per module, each registering its own parsers."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..cluster.etcd import EtcdError

# Modules under appliance.cli that each define ``register(subparsers)``.
GROUPS = ("up", "status", "cluster", "node", "drive", "fs", "target", "nvme")
COMMAND_GROUP = {"down": "up"}  # commands registered by a module of another name


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with a known ``command`` only its module is imported, so `kahu status` starts fast."""
    parser = argparse.ArgumentParser(prog="kahu", description="Kahu distributed file system appliance")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    group = COMMAND_GROUP.get(command or "", command)
    for name in (group,) if group in GROUPS else GROUPS:
        importlib.import_module(f"appliance.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, EtcdError) as e:
        print(f"kahu: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
