"""The discovery log page (LID 70h) as one host sees it: only subsystems that host may reach."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..identify import DiscoveryEntry, pack_discovery_log
from ..spec import AddressFamily, SubsystemType, TransportType

if TYPE_CHECKING:
    from .server import TargetServer


def discovery_log(server: TargetServer, hostnqn: str) -> bytearray:
    """Every listener of every NVMe subsystem ``hostnqn`` may access, then the discovery listeners."""
    target = server.target
    entries = []
    for sub in target.subsystems.values():
        if not sub.is_discovery and not sub.host_allowed(hostnqn):
            continue
        subtype = SubsystemType.CURRENT_DISCOVERY if sub.is_discovery else SubsystemType.NVME
        for portid, address in enumerate(sub.listeners):
            family = AddressFamily.IPV6 if address.adrfam.lower() == "ipv6" else AddressFamily.IPV4
            entries.append(
                DiscoveryEntry(
                    subnqn=sub.nqn,
                    traddr=address.traddr,
                    trsvcid=str(server.bound_port(address)),
                    trtype=TransportType.TCP,
                    adrfam=family,
                    subtype=subtype,
                    portid=portid,
                    asqsz=target.tcp.max_aq_depth,
                )
            )
    return pack_discovery_log(server.genctr, entries)
