"""Child processes: stopping one politely, then firmly, within a bound."""

from __future__ import annotations

import subprocess
from typing import Any


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL: a child that ignores SIGTERM cannot hang its owner."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(timeout=timeout)
