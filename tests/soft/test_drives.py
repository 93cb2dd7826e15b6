"""nvme-cli wrapper: parsers against recorded nvme-cli 2.x JSON, the runner, and this host's real nvme-cli."""

from __future__ import annotations

import glob
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import main as cli_main
from appliance.spdk_rpc.drives import (
    DriveToolError,
    NvmeCli,
    parse_discovery_log,
    parse_id_ctrl,
    parse_list,
    parse_smart_log,
)

DATA = Path(__file__).parent / "data" / "nvme-cli"
HOST_HAS_NVME = bool(glob.glob("/dev/nvme[0-9]*"))


def fixture(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def test_flat_list_of_nvme_cli_2_3() -> None:
    samsung, intel, spdk = parse_list(fixture("list-2.3.json"))
    assert (samsung.device_path, samsung.generic_path, samsung.nsid) == ("/dev/nvme0n1", "/dev/ng0n1", 1)
    assert (samsung.serial_number, samsung.model_number, samsung.firmware) == (
        "S5GXNF0R123456A", "Samsung SSD 980 PRO 1TB", "5B2QGXA7")
    assert (samsung.sector_size, samsung.maximum_lba) == (512, 1953525168)
    assert samsung.physical_size == 1000204886016
    assert intel.sector_size == 4096 and intel.physical_size == intel.maximum_lba * 4096
    assert spdk.model_number == "SPDK bdev Controller" and spdk.used_bytes == 64 << 20
    assert samsung.controller is None and samsung.transport is None


def test_verbose_list_carries_controllers_and_multipath_heads() -> None:
    namespaces = {ns.device_path: ns for ns in parse_list(fixture("list-verbose.json"))}
    assert set(namespaces) == {"/dev/nvme0n1", "/dev/nvme1n1", "/dev/nvme2n1"}
    head = namespaces["/dev/nvme0n1"]  # multipath head, listed under the subsystem
    assert (head.controller, head.transport, head.address) == ("nvme0", "pcie", "0000:01:00.0")
    assert head.generic_path == "/dev/ng0n1" and head.serial_number == "S5GXNF0R123456A"
    direct = namespaces["/dev/nvme1n1"]  # non-multipath, listed under its controller
    assert (direct.controller, direct.address, direct.sector_size) == ("nvme1", "0000:0a:00.0", 4096)
    tcp = namespaces["/dev/nvme2n1"]
    assert tcp.transport == "tcp" and tcp.subsystem_nqn == "nqn.2026-11.io.kahu:node1"
    assert tcp.address and tcp.address.startswith("traddr=10.77.0.11,trsvcid=4420")


def test_both_list_forms_describe_the_same_drives() -> None:
    def key(ns: Any) -> tuple[Any, ...]:
        return ns.device_path, ns.nsid, ns.physical_size, ns.sector_size, ns.serial_number, ns.firmware

    flat = sorted(map(key, parse_list(fixture("list-2.3.json"))))
    assert flat == sorted(map(key, parse_list(fixture("list-verbose.json"))))
    assert parse_list(fixture("list-empty.json")) == []


def test_id_ctrl() -> None:
    ident = parse_id_ctrl(fixture("id-ctrl.json"))
    assert (ident.serial_number, ident.model_number, ident.firmware) == (
        "S5GXNF0R123456A", "Samsung SSD 980 PRO 1TB", "5B2QGXA7")
    assert (ident.vid, ident.version, ident.mdts, ident.nn, ident.cntlid) == (0x144D, "1.4.0", 9, 1, 6)
    assert ident.total_capacity == 1000204886016  # printed as the json-c double 1000204886016.0
    assert ident.subnqn and ident.subnqn.startswith("nqn.2014.08.org.nvmexpress:144d144d")


def test_smart_log_with_json_c_doubles() -> None:
    smart = parse_smart_log(fixture("smart-log-double.json"))
    assert smart.temperature_kelvin == 310 and smart.temperature_celsius == 37
    assert smart.data_units_written == 31262513 and smart.bytes_written == 31262513 * 512000
    assert (smart.power_on_hours, smart.unsafe_shutdowns, smart.media_errors) == (4321, 17, 0)
    assert smart.healthy


def test_smart_log_of_a_worn_drive_is_unhealthy() -> None:
    smart = parse_smart_log(fixture("smart-log-uint128.json"))
    assert (smart.critical_warning, smart.available_spare, smart.percent_used) == (4, 5, 104)
    assert smart.media_errors == 3 and not smart.healthy


def test_smart_log_human_form_has_a_critical_warning_object() -> None:
    doc = fixture("smart-log-double.json")
    doc["critical_warning"] = {"value": 8, "available_spare": 0, "temp_threshold": 0, "ro": 1}
    assert parse_smart_log(doc).critical_warning == 8


def test_discovery_log_strips_spdk_padding() -> None:
    disc, subsys = parse_discovery_log(fixture("discover-tcp.json"))
    assert disc.is_discovery and not subsys.is_discovery
    assert (disc.traddr, disc.trsvcid) == ("10.77.0.11", "8009")
    assert disc.subnqn == "nqn.2014-08.org.nvmexpress.discovery"
    assert (subsys.trtype, subsys.adrfam, subsys.trsvcid, subsys.subnqn) == (
        "tcp", "ipv4", "4420", "nqn.2026-11.io.kahu:node1")


@pytest.mark.parametrize(
    ("name", "parser", "mutate", "message"),
    [
        ("list-2.3.json", parse_list, lambda d: d["Devices"][1].pop("DevicePath"), r"Devices\[1\]\.DevicePa"),
        ("list-2.3.json", parse_list, lambda d: d.pop("Devices"), r"nvme list\.Devices"),
        ("list-verbose.json", parse_list,
         lambda d: d["Devices"][0]["Subsystems"][2]["Namespaces"][0].update(NSID="x"),
         r"Subsystems\[2\]\.Namespaces\[0\]\.NSID"),
        ("id-ctrl.json", parse_id_ctrl, lambda d: d.update(ver=True), r"id-ctrl\.ver"),
        ("smart-log-double.json", parse_smart_log, lambda d: d.update(temperature=310.5), r"smart-log\.temp"),
        ("discover-tcp.json", parse_discovery_log, lambda d: d["records"][0].pop("subnqn"), r"\[0\]\.subnqn"),
    ],
)
def test_unexpected_output_names_the_field(name: str, parser: Any, mutate: Any, message: str) -> None:
    doc = fixture(name)
    mutate(doc)
    with pytest.raises(DriveToolError, match=message):
        parser(doc)


def test_missing_nvme_cli_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DriveToolError, match=r"nvme-cli not found.*nvme-cli"):
        NvmeCli().list_namespaces()
    with pytest.raises(DriveToolError, match="nvme-cli not found"):
        NvmeCli(sysfs_class=str(tmp_path)).id_ctrl("/dev/nvme0")


@pytest.mark.skipif(HOST_HAS_NVME, reason="this host has NVMe devices (tests/hw covers them)")
def test_real_nvme_list_on_a_host_without_drives() -> None:
    assert NvmeCli().list_namespaces() == []
    assert NvmeCli().list_namespaces(verbose=True) == []


@pytest.mark.skipif(os.path.exists("/dev/nvme-fabrics"), reason="this kernel has NVMe-oF host support")
def test_real_discover_without_kernel_fabrics_support() -> None:
    with pytest.raises(DriveToolError, match=r"/dev/nvme-fabrics is missing.*modprobe nvme-tcp"):
        NvmeCli().discover("127.0.0.1")
    with pytest.raises(DriveToolError, match="nvme-fabrics"):
        NvmeCli().connect("nqn.2026-11.io.kahu:x", "127.0.0.1")


FAKE_NVME = """#!/bin/sh
printf '%s\\n' "$*" >> "{log}"
if [ -n "$FAKE_NVME_FAIL" ]; then
    echo "Failed to open /dev/nvme-fabrics: No such file or directory" >&2
    exit 1
fi
if [ -n "$FAKE_NVME_TEXT" ]; then
    echo "NVME Identify Controller:"
    exit 0
fi
case "$1" in
    list) cat "{data}/list-2.3.json" ;;
    id-ctrl) cat "{data}/id-ctrl.json" ;;
    smart-log) cat "{data}/smart-log-double.json" ;;
    discover) cat "{data}/discover-tcp.json" ;;
    connect) cat "{data}/connect.json" ;;
    disconnect) echo "NQN:$3 disconnected 1 controller(s)" ;;
esac
"""


@pytest.fixture
def fake_nvme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[NvmeCli, Path]:
    """An ``nvme`` on PATH that logs its arguments and prints the recorded fixtures."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "argv.log"
    script = bindir / "nvme"
    script.write_text(FAKE_NVME.format(log=log, data=DATA))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    fabrics = tmp_path / "nvme-fabrics"
    fabrics.touch()
    return NvmeCli(fabrics_device=str(fabrics), sysfs_class=str(tmp_path)), log


def test_runner_builds_command_lines_and_parses_output(fake_nvme: tuple[NvmeCli, Path]) -> None:
    nvme, log = fake_nvme
    assert len(nvme.list_namespaces()) == 3
    assert nvme.id_ctrl("/dev/nvme0").version == "1.4.0"
    assert nvme.smart_log("/dev/nvme0").temperature_celsius == 37
    assert len(nvme.discover("10.77.0.11", hostnqn="nqn.2014-08.org.nvmexpress:uuid:h1")) == 2
    assert nvme.connect("nqn.2026-11.io.kahu:node1", "10.77.0.11") == "nvme2"
    assert nvme.disconnect("nqn.2026-11.io.kahu:node1") == 1
    assert log.read_text().splitlines() == [
        "list -o json",
        "id-ctrl /dev/nvme0 -o json",
        "smart-log /dev/nvme0 -o json",
        "discover -t tcp -a 10.77.0.11 -s 8009 -o json -q nqn.2014-08.org.nvmexpress:uuid:h1",
        "connect -t tcp -a 10.77.0.11 -s 4420 -n nqn.2026-11.io.kahu:node1 -o json",
        "disconnect -n nqn.2026-11.io.kahu:node1",
    ]


def test_runner_maps_fabrics_failures(
    fake_nvme: tuple[NvmeCli, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    nvme, _ = fake_nvme
    monkeypatch.setenv("FAKE_NVME_FAIL", "1")
    with pytest.raises(DriveToolError, match="lacks NVMe-oF host support: Failed to open /dev/nvme-fabrics"):
        nvme.connect("nqn.2026-11.io.kahu:node1", "10.77.0.11")


def test_runner_rejects_output_that_is_not_json(
    fake_nvme: tuple[NvmeCli, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    nvme, _ = fake_nvme
    monkeypatch.setenv("FAKE_NVME_TEXT", "1")
    with pytest.raises(DriveToolError, match="id-ctrl: output is not JSON"):
        nvme.id_ctrl("/dev/nvme0")


@pytest.mark.skipif(HOST_HAS_NVME, reason="this host has NVMe devices (tests/hw covers them)")
def test_cli_drives(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main.main(["node", "drives", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli_main.main(["node", "drives"]) == 0
    assert capsys.readouterr().out == "no NVMe namespaces\n"
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cli_main.main(["node", "drives"]) == 1
    assert "nvme-cli not found" in capsys.readouterr().err
