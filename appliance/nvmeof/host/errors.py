"""Exceptions the host raises: one per way a command can fail (status, timeout, lost transport)."""

from __future__ import annotations

from ..spec import Fes, status_name

HOST_PATH_ERROR = 0x370  # SCT 3 / SC 0x70: what Linux reports when the transport, not the target, failed


class NvmeError(Exception):
    """A command completed with an error status; ``status`` is ``(sct << 8) | sc``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    @property
    def status_name(self) -> str:
        return status_name(self.status)


class NvmeTimeout(NvmeError, TimeoutError):
    """The target did not answer within the command timeout."""

    def __init__(self, message: str):
        super().__init__(HOST_PATH_ERROR, message)


class NvmeTransportError(NvmeError, ConnectionError):
    """The queue's connection failed: closed, reset, a protocol error, or a C2HTermReq (``fes``/``fei``)."""

    def __init__(self, message: str, fes: int | None = None, fei: int | None = None):
        if fes is not None:
            try:
                fes_name = Fes(fes).name
            except ValueError:
                fes_name = f"0x{fes:02x}"
            message = f"{message} (FES {fes_name}, FEI {fei})"
        super().__init__(HOST_PATH_ERROR, message)
        self.fes = fes
        self.fei = fei
