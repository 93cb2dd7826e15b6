"""The NVMe/TCP host (initiator): controllers, queues and discovery over asyncio."""

from .controller import AdminResult, Controller, NamespaceInfo
from .discovery import discover, read_discovery_log
from .errors import NvmeError, NvmeTimeout, NvmeTransportError

__all__ = [
    "AdminResult",
    "Controller",
    "NamespaceInfo",
    "NvmeError",
    "NvmeTimeout",
    "NvmeTransportError",
    "discover",
    "read_discovery_log",
]
