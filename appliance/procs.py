"""Child processes: starting Kahu's own commands, tying children to their owner, telling whether a
process still runs, and stopping one politely, then firmly, within a bound."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the tree this very ``appliance`` package is in


def kahu_command(*args: str) -> list[str]:
    """``kahu ARGS`` as a child process of this interpreter (the same virtual environment)."""
    return [sys.executable, "-m", "appliance.cli.main", *args]


def kahu_env() -> dict[str, str]:
    """The environment in which ``kahu_command`` runs this same source tree, installed or not."""
    path = os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def notify(fd: int | None, message: str) -> None:
    """systemd-notify style: one line (READY, or ERROR and why) to the pipe a starter gave us, which is
    then closed; nothing when started without one, and a starter gone already is not an error."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, message.replace("\n", " ").encode() + b"\n")
            os.close(fd)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped by an init that may never reap) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


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


async def stop_async_process(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> None:
    """``stop_process`` for an asyncio child; idempotent. After SIGKILL the wait is not bounded."""
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        log.warning("pid %d ignored SIGTERM for %gs; killing it", proc.pid, timeout)
        proc.kill()
        await proc.wait()


PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """A ``preexec_fn``: the child gets ``sig`` when its parent dies, so a crashed owner (a node's
    backend, the one-machine supervisor) never leaves its children running and holding ports.

    The kernel ties this to the *thread* that forked, so use it only from the main thread (see
    ``tied_to_parent``): a child started from a worker thread would die with that thread."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def tied_to_parent() -> Callable[[], None] | None:
    """``die_with_parent`` when called on the main thread (whose end is the process's end), else None."""
    return die_with_parent if threading.current_thread() is threading.main_thread() else None
