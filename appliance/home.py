"""Where a machine keeps Kahu's files (etcd data, drive files, logs, the running cluster's record)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

HOME_ENV = "KAHU_HOME"
ETCD_ENV = "KAHU_ETCD"
RUNNING_FILE = "running.json"  # written by `kahu up` while its cluster runs
DEFAULT_ETCD = "http://127.0.0.1:2379"


def default_home() -> Path:
    """$KAHU_HOME, else /var/lib/kahu for root (an appliance), else ~/.local/state/kahu."""
    if HOME_ENV in os.environ:
        return Path(os.environ[HOME_ENV])
    if os.geteuid() == 0:
        return Path("/var/lib/kahu")
    return Path.home() / ".local" / "state" / "kahu"


def running_record(home: Path) -> dict[str, Any] | None:
    """What `kahu up` recorded about the cluster it runs from ``home``, or None."""
    try:
        return json.loads((home / RUNNING_FILE).read_text())
    except (OSError, ValueError):
        return None


def etcd_endpoints(explicit: str | None, home: Path) -> list[str]:
    """--etcd, else $KAHU_ETCD, else the cluster `kahu up` runs from ``home``, else local etcd."""
    text = explicit or os.environ.get(ETCD_ENV)
    if text:
        endpoints = [e.strip() for e in text.split(",") if e.strip()]
        for e in endpoints:
            if not e.startswith(("http://", "https://")):
                raise ValueError(f"--etcd: {e!r} is not a URL like http://10.0.0.1:2379")
        if not endpoints:
            raise ValueError("--etcd: give at least one URL")
        return endpoints
    record = running_record(home)
    if record and record.get("etcd"):
        return list(record["etcd"])
    return [DEFAULT_ETCD]
