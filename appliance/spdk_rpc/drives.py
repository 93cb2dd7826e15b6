"""Drive discovery and kernel NVMe-oF host control through nvme-cli (``nvme ... -o json``).

Kahu needs to know which NVMe drives a node has (before SPDK takes them over), their health, and on
hosts that use the kernel initiator, how to discover and connect Kahu's targets. nvme-cli already
speaks to the kernel for all of that; this module runs it and parses its JSON into typed records.
The parsers accept what nvme-cli 2.x prints: the flat ``nvme list`` form of 2.0-2.3 and the nested
Subsystems/Controllers/Namespaces form of ``--verbose`` (and 2.4+), and numbers printed as integers,
floats (json-c doubles for 128-bit counters) or strings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..nvmeof.spec import DISCOVERY_PORT, NVME_PORT

KELVIN_OFFSET = 273
DATA_UNIT_BYTES = 512 * 1000  # SMART data units are thousands of 512-byte blocks
FABRICS_DEVICE = "/dev/nvme-fabrics"
SYSFS_NVME_CLASS = "/sys/class/nvme"


class DriveToolError(OSError):
    """nvme-cli is missing, the kernel lacks NVMe support, or nvme-cli failed or printed nonsense."""


@dataclass(frozen=True)
class Namespace:
    """One namespace block device as ``nvme list`` shows it."""

    device_path: str  # /dev/nvme0n1
    nsid: int
    sector_size: int
    maximum_lba: int
    physical_size: int  # bytes
    used_bytes: int
    generic_path: str | None = None  # /dev/ng0n1
    serial_number: str | None = None
    model_number: str | None = None
    firmware: str | None = None
    controller: str | None = None  # nvme0 (verbose form only)
    transport: str | None = None  # pcie, tcp, rdma (verbose form only)
    address: str | None = None  # PCI address or "traddr=...,trsvcid=..." (verbose form only)
    subsystem_nqn: str | None = None  # verbose form only


@dataclass(frozen=True)
class ControllerIdentity:
    """The Identify Controller fields Kahu uses (``nvme id-ctrl``)."""

    vid: int
    ssvid: int
    serial_number: str
    model_number: str
    firmware: str
    cntlid: int
    version: str  # "1.4.0"
    mdts: int
    nn: int
    total_capacity: int  # tnvmcap, bytes (0 when the drive does not report it)
    unallocated_capacity: int
    subnqn: str | None


@dataclass(frozen=True)
class SmartLog:
    """SMART / Health Information (``nvme smart-log``)."""

    critical_warning: int
    temperature_kelvin: int
    available_spare: int
    spare_threshold: int
    percent_used: int
    data_units_read: int
    data_units_written: int
    host_read_commands: int
    host_write_commands: int
    power_cycles: int
    power_on_hours: int
    unsafe_shutdowns: int
    media_errors: int
    num_err_log_entries: int

    @property
    def temperature_celsius(self) -> int:
        return self.temperature_kelvin - KELVIN_OFFSET

    @property
    def bytes_written(self) -> int:
        return self.data_units_written * DATA_UNIT_BYTES

    @property
    def healthy(self) -> bool:
        """No critical warning bit set and spare capacity above the vendor's threshold."""
        return self.critical_warning == 0 and self.available_spare >= self.spare_threshold


@dataclass(frozen=True)
class DiscoveryRecord:
    """One Discovery Log Page entry (``nvme discover``)."""

    trtype: str
    adrfam: str
    subtype: str
    traddr: str
    trsvcid: str
    subnqn: str
    portid: int
    treq: str = "not specified"
    sectype: str | None = None

    @property
    def is_discovery(self) -> bool:
        return "discovery" in self.subtype


# --- parsers ----------------------------------------------------------------------------------------

# SmartLog fields whose nvme-cli key differs from the field name; the others are named alike.
_SMART_KEYS = {"temperature_kelvin": "temperature", "available_spare": "avail_spare",
               "spare_threshold": "spare_thresh"}


def parse_list(doc: Any) -> list[Namespace]:
    """Parse ``nvme list -o json`` in the flat (2.0-2.3) or nested (``--verbose``, 2.4+) form."""
    devices = _list(_obj(doc, "nvme list").get("Devices"), "nvme list.Devices")
    namespaces: list[Namespace] = []
    for i, dev in enumerate(devices):
        dev = _obj(dev, f"Devices[{i}]")
        if "Subsystems" in dev:
            namespaces.extend(_host_namespaces(dev, f"Devices[{i}]"))
        else:
            namespaces.append(_flat_namespace(dev, f"Devices[{i}]"))
    return namespaces


def parse_id_ctrl(doc: Any) -> ControllerIdentity:
    """Parse ``nvme id-ctrl DEV -o json``."""
    d = _obj(doc, "id-ctrl")
    ver = _int(d, "ver", "id-ctrl")
    subnqn = d.get("subnqn")
    return ControllerIdentity(
        vid=_int(d, "vid", "id-ctrl"),
        ssvid=_int(d, "ssvid", "id-ctrl"),
        serial_number=_str(d, "sn", "id-ctrl").strip(),
        model_number=_str(d, "mn", "id-ctrl").strip(),
        firmware=_str(d, "fr", "id-ctrl").strip(),
        cntlid=_int(d, "cntlid", "id-ctrl"),
        version=f"{ver >> 16}.{(ver >> 8) & 0xFF}.{ver & 0xFF}",
        mdts=_int(d, "mdts", "id-ctrl"),
        nn=_int(d, "nn", "id-ctrl"),
        total_capacity=_int(d, "tnvmcap", "id-ctrl", default=0),
        unallocated_capacity=_int(d, "unvmcap", "id-ctrl", default=0),
        subnqn=subnqn.strip() if isinstance(subnqn, str) and subnqn.strip() else None,
    )


def parse_smart_log(doc: Any) -> SmartLog:
    """Parse ``nvme smart-log DEV -o json`` (also the ``-H`` form with a critical_warning object)."""
    d = _obj(doc, "smart-log")
    warning = d.get("critical_warning")
    if isinstance(warning, dict):  # human-readable form: {"value": N, "available_spare": 0, ...}
        warning = warning.get("value")
    counters = {
        f.name: _int(d, _SMART_KEYS.get(f.name, f.name), "smart-log")
        for f in fields(SmartLog) if f.name != "critical_warning"
    }
    return SmartLog(critical_warning=_number(warning, "smart-log.critical_warning"), **counters)


def parse_discovery_log(doc: Any) -> list[DiscoveryRecord]:
    """Parse ``nvme discover -o json``: {"genctr": N, "records": [...]}."""
    d = _obj(doc, "discover")
    records = _list(d.get("records", []), "discover.records")
    out = []
    for i, rec in enumerate(records):
        where = f"discover.records[{i}]"
        r = _obj(rec, where)
        out.append(
            DiscoveryRecord(
                trtype=_str(r, "trtype", where),
                adrfam=_str(r, "adrfam", where),
                subtype=_str(r, "subtype", where),
                traddr=_str(r, "traddr", where).strip(),
                trsvcid=_str(r, "trsvcid", where).strip(),
                subnqn=_str(r, "subnqn", where).strip(),
                portid=_int(r, "portid", where),
                treq=r.get("treq", "not specified"),
                sectype=r.get("sectype"),
            )
        )
    return out


def _flat_namespace(d: dict[str, Any], where: str) -> Namespace:
    return Namespace(
        device_path=_str(d, "DevicePath", where),
        generic_path=d.get("GenericPath"),
        nsid=_int(d, "NameSpace", where),
        serial_number=_opt_str(d, "SerialNumber"),
        model_number=_opt_str(d, "ModelNumber"),
        firmware=_opt_str(d, "Firmware"),
        **_geometry(d, where),
    )


def _host_namespaces(host: dict[str, Any], where: str) -> list[Namespace]:
    out: list[Namespace] = []
    for s, sub in enumerate(_list(host["Subsystems"], f"{where}.Subsystems")):
        swhere = f"{where}.Subsystems[{s}]"
        sub = _obj(sub, swhere)
        nqn = _opt_str(sub, "SubsystemNQN")
        ctrls = [_obj(c, f"{swhere}.Controllers[{j}]")
                 for j, c in enumerate(_list(sub.get("Controllers", []), f"{swhere}.Controllers"))]
        for j, ctrl in enumerate(ctrls):
            cwhere = f"{swhere}.Controllers[{j}].Namespaces"
            for k, ns in enumerate(_list(ctrl.get("Namespaces", []), cwhere)):
                out.append(_nested_namespace(ns, f"{cwhere}[{k}]", ctrl, nqn))
        # Multipath heads hang off the subsystem; describe them by the subsystem's first controller.
        first = ctrls[0] if ctrls else {}
        for k, ns in enumerate(_list(sub.get("Namespaces", []), f"{swhere}.Namespaces")):
            out.append(_nested_namespace(ns, f"{swhere}.Namespaces[{k}]", first, nqn))
    return out


def _nested_namespace(ns: Any, where: str, ctrl: dict[str, Any], nqn: str | None) -> Namespace:
    d = _obj(ns, where)
    generic = _opt_str(d, "Generic")
    return Namespace(
        device_path="/dev/" + _str(d, "NameSpace", where),
        generic_path=f"/dev/{generic}" if generic else None,
        nsid=_int(d, "NSID", where),
        serial_number=_opt_str(ctrl, "SerialNumber"),
        model_number=_opt_str(ctrl, "ModelNumber"),
        firmware=_opt_str(ctrl, "Firmware"),
        controller=_opt_str(ctrl, "Controller"),
        transport=_opt_str(ctrl, "Transport"),
        address=_opt_str(ctrl, "Address"),
        subsystem_nqn=nqn,
        **_geometry(d, where),
    )


def _geometry(d: dict[str, Any], where: str) -> dict[str, int]:
    return {
        "sector_size": _int(d, "SectorSize", where),
        "maximum_lba": _int(d, "MaximumLBA", where),
        "physical_size": _int(d, "PhysicalSize", where),
        "used_bytes": _int(d, "UsedBytes", where),
    }


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DriveToolError(f"{where}: unexpected output: expected a JSON object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise DriveToolError(f"{where}: unexpected output: expected a JSON array")
    return value


def _str(d: dict[str, Any], key: str, where: str) -> str:
    value = d.get(key)
    if not isinstance(value, str):
        raise DriveToolError(f"{where}.{key}: unexpected output: expected a string, got {value!r}")
    return value


def _opt_str(d: dict[str, Any], key: str) -> str | None:
    value = d.get(key)
    return value.strip() or None if isinstance(value, str) else None


def _int(d: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    if key not in d and default is not None:
        return default
    return _number(d.get(key), f"{where}.{key}")


def _number(value: Any, where: str) -> int:
    """An integer printed as a JSON integer, an integral double (json-c) or a decimal string."""
    if isinstance(value, bool):
        raise DriveToolError(f"{where}: unexpected output: expected a number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.0+)?\s*", value):
        return int(value.strip().split(".")[0])
    raise DriveToolError(f"{where}: unexpected output: expected a number, got {value!r}")


# --- running nvme-cli -------------------------------------------------------------------------------


class NvmeCli:
    """Runs nvme-cli with JSON output. Paths are parameters so tests can point them elsewhere."""

    def __init__(
        self,
        binary: str = "nvme",
        *,
        timeout: float = 30.0,
        fabrics_device: str = FABRICS_DEVICE,
        sysfs_class: str = SYSFS_NVME_CLASS,
    ):
        self.binary = binary
        self.timeout = timeout
        self.fabrics_device = fabrics_device
        self.sysfs_class = sysfs_class

    def list_namespaces(self, verbose: bool = False) -> list[Namespace]:
        """All NVMe namespaces the kernel sees; empty when the kernel has no NVMe driver loaded."""
        args = ["list", "-o", "json"] + (["--verbose"] if verbose else [])
        if not Path(self.sysfs_class).is_dir():
            # No nvme core module: nvme-cli fails with "Failed to scan topology", but there simply
            # are no NVMe devices. Still require the tool, so a missing nvme-cli is reported.
            self._resolve()
            return []
        return parse_list(self._json(args))

    def id_ctrl(self, device: str) -> ControllerIdentity:
        return parse_id_ctrl(self._json(["id-ctrl", device, "-o", "json"]))

    def smart_log(self, device: str) -> SmartLog:
        return parse_smart_log(self._json(["smart-log", device, "-o", "json"]))

    def discover(
        self, traddr: str, trsvcid: int = DISCOVERY_PORT, transport: str = "tcp", hostnqn: str | None = None
    ) -> list[DiscoveryRecord]:
        """Read a discovery controller's log page through the kernel host."""
        self._require_fabrics()
        args = ["discover", "-t", transport, "-a", traddr, "-s", str(trsvcid), "-o", "json"]
        return parse_discovery_log(self._json(args + _hostnqn_args(hostnqn)))

    def connect(
        self,
        subnqn: str,
        traddr: str,
        trsvcid: int = NVME_PORT,
        transport: str = "tcp",
        hostnqn: str | None = None,
    ) -> str:
        """Connect the kernel host to a subsystem; return the new controller's name (e.g. nvme1)."""
        self._require_fabrics()
        args = ["connect", "-t", transport, "-a", traddr, "-s", str(trsvcid), "-n", subnqn, "-o", "json"]
        doc = _obj(self._json(args + _hostnqn_args(hostnqn)), "connect")
        return _str(doc, "device", "connect")

    def disconnect(self, subnqn: str) -> int:
        """Disconnect every controller of ``subnqn``; return how many there were."""
        out = self._run(["disconnect", "-n", subnqn])
        match = re.search(r"disconnected (\d+) controller", out)
        return int(match.group(1)) if match else 0

    def _require_fabrics(self) -> None:
        if not os.path.exists(self.fabrics_device):
            raise DriveToolError(
                f"{self.fabrics_device} is missing: this kernel has no NVMe-oF host support loaded "
                "(modprobe nvme-tcp)"
            )

    def _resolve(self) -> str:
        path = shutil.which(self.binary)
        if path is None:
            raise DriveToolError(
                f"nvme-cli not found ({self.binary!r} is not on PATH): install the Debian package nvme-cli"
            )
        return path

    def _json(self, args: list[str]) -> Any:
        out = self._run(args)
        try:
            return json.loads(out)
        except json.JSONDecodeError as e:
            raise DriveToolError(f"nvme {args[0]}: output is not JSON ({e}): {out[:200]!r}") from None

    def _run(self, args: list[str]) -> str:
        argv = [self._resolve(), *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired:
            raise DriveToolError(f"nvme {args[0]}: no answer within {self.timeout:g}s") from None
        if proc.returncode != 0:
            err = proc.stderr.strip() or proc.stdout.strip()
            if "nvme-fabrics" in err:
                raise DriveToolError(f"nvme {args[0]}: kernel lacks NVMe-oF host support: {err}")
            raise DriveToolError(f"nvme {' '.join(args)} failed (exit {proc.returncode}): {err}")
        return proc.stdout


def _hostnqn_args(hostnqn: str | None) -> list[str]:
    return ["-q", hostnqn] if hostnqn else []
