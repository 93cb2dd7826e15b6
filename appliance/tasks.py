"""Structured concurrency helpers: every task started here is awaited or cancelled before returning."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable
from typing import Any


async def first_completed(*aws: Awaitable[Any]) -> None:
    """Run ``aws`` together until the first finishes or fails; cancel and await the rest.

    The first failure is re-raised as itself (not wrapped in an ExceptionGroup), so callers handle
    it like the failure of a plain ``await``.
    """
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if not t.cancelled() and (error := t.exception()) is not None:
            raise error


def stop_on_signals() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets: the graceful-stop request of a service's main task."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
