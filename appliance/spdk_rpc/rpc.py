"""A small typed layer over SPDK's own JSON-RPC client (``spdk.rpc.client.JSONRPCClient``).

SPDK 26.x dropped its per-area Python modules, so calls go by method name. This wrapper adds what
an orchestrator needs on top: a bounded wait for a freshly started target's socket, a timeout per
call, and one exception, ``RpcError``, that says which method failed, with SPDK's error code and
message, instead of the client's multi-line text. The client is blocking; async callers run calls
with ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

from spdk.rpc.client import JSONRPCClient, JSONRPCException

DEFAULT_TIMEOUT = 30.0
SOCKET_POLL_INTERVAL = 0.05


class RpcError(Exception):
    """``method`` failed: ``code`` is SPDK's JSON-RPC error code, None when no answer arrived."""

    def __init__(self, method: str, code: int | None, message: str):
        detail = f"{message} (code {code})" if code is not None else message
        super().__init__(f"{method}: {detail}")
        self.method = method
        self.code = code
        self.message = message


class RpcConnectionError(RpcError):
    """The target did not answer: the socket is missing, closed or the call timed out."""

    def __init__(self, method: str, message: str):
        super().__init__(method, None, message)


class SpdkRpc:
    """One connection to a target's JSON-RPC socket (SPDK or the soft target)."""

    def __init__(self, client: JSONRPCClient, path: str):
        self._client = client
        self._lock = threading.Lock()  # one request/answer in flight per connection
        self.path = path

    @classmethod
    def connect(cls, path: str, timeout: float = DEFAULT_TIMEOUT, wait: float = 0.0) -> SpdkRpc:
        """Connect to ``path``, waiting up to ``wait`` seconds for the socket to appear and accept."""
        if timeout <= 0:
            raise ValueError(f"RPC timeout must be positive, got {timeout}")
        deadline = time.monotonic() + wait
        while True:
            try:
                if not os.path.exists(path):
                    raise JSONRPCException(f"socket {path} does not exist")
                # The client announces its own log level at INFO through its own handler: keep it quiet.
                logging.getLogger(f"JSONRPCClient({path})").setLevel(logging.ERROR)
                return cls(JSONRPCClient(path, timeout=timeout), path)
            except JSONRPCException as e:
                if time.monotonic() >= deadline:
                    waited = f" after waiting {wait:g}s" if wait else ""
                    problem = f"cannot connect to {path}{waited}: {e.message}"
                    raise RpcConnectionError("connect", problem) from e
            time.sleep(SOCKET_POLL_INTERVAL)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the peer may already be gone
            self._client.close()
        self._client.sock = None

    def __enter__(self) -> SpdkRpc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Call ``method``; return its result or raise ``RpcError``."""
        with self._lock:
            if self._client.sock is None:
                raise RpcConnectionError(method, f"connection to {self.path} is closed")
            try:
                self._client.send(method, params or None)
                answer = self._client.recv()
            except (JSONRPCException, OSError) as e:
                self.close()  # a late answer would be taken for the next call's: start over
                detail = e.message.strip() if isinstance(e, JSONRPCException) else str(e)
                raise RpcConnectionError(method, f"{self.path}: {detail}") from e
        error = answer.get("error")
        if error is not None:
            raise RpcError(method, error.get("code"), error.get("message", ""))
        return answer.get("result")

    # --- typed helpers (parameter names are SPDK's) ----------------------------------------------

    def framework_wait_init(self) -> None:
        self.call("framework_wait_init")

    def spdk_get_version(self) -> dict[str, Any]:
        return self.call("spdk_get_version")

    def nvmf_get_transports(self) -> list[dict[str, Any]]:
        return self.call("nvmf_get_transports")

    def bdev_get_bdevs(self) -> list[dict[str, Any]]:
        return self.call("bdev_get_bdevs")

    def nvmf_get_subsystems(self) -> list[dict[str, Any]]:
        return self.call("nvmf_get_subsystems")


