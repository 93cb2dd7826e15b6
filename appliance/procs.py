"""Child processes: stopping one politely, then firmly, within a bound."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


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
