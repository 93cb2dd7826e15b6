"""Discovery: read a discovery controller's log page (0x70) the way libnvme does.

Header first, then the whole log by LPO in 4 KiB chunks, then GENCTR again; if it moved while we
read, the log changed under us and we start over (bounded).
"""

from __future__ import annotations

from ..identify import (
    DISCOVERY_ENTRY_SIZE,
    DISCOVERY_HEADER_SIZE,
    DiscoveryEntry,
    unpack_discovery_header,
)
from ..spec import DISCOVERY_NQN, DISCOVERY_PORT, LogPage
from .controller import Controller
from .errors import NvmeError

CHUNK = 4096
ATTEMPTS = 5


async def read_discovery_log(ctrl: Controller) -> list[DiscoveryEntry]:
    """The log page of an already connected discovery controller."""
    for _ in range(ATTEMPTS):
        genctr, numrec = unpack_discovery_header(
            await ctrl.get_log_page(LogPage.DISCOVERY, DISCOVERY_HEADER_SIZE, nsid=0)
        )
        total = DISCOVERY_HEADER_SIZE + numrec * DISCOVERY_ENTRY_SIZE
        log = bytearray()
        for offset in range(0, total, CHUNK):
            log += await ctrl.get_log_page(LogPage.DISCOVERY, min(CHUNK, total - offset), offset, nsid=0)
        again, _ = unpack_discovery_header(await ctrl.get_log_page(LogPage.DISCOVERY, 16, nsid=0))
        if again == genctr and unpack_discovery_header(log)[0] == genctr:
            return [
                DiscoveryEntry.unpack(log[start : start + DISCOVERY_ENTRY_SIZE])
                for start in range(DISCOVERY_HEADER_SIZE, total, DISCOVERY_ENTRY_SIZE)
            ]
    raise NvmeError(0x190, f"discovery log kept changing over {ATTEMPTS} reads")


async def discover(
    traddr: str, trsvcid: int | str = DISCOVERY_PORT, hostnqn: str | None = None, timeout: float = 10.0
) -> list[DiscoveryEntry]:
    """Connect to the discovery controller, read its whole log, disconnect."""
    ctrl = await Controller.connect(
        traddr, trsvcid, DISCOVERY_NQN, hostnqn=hostnqn, kato_ms=0, timeout=timeout
    )
    try:
        return await read_discovery_log(ctrl)
    finally:
        await ctrl.close()
