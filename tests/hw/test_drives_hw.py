"""Drive discovery against this machine's real NVMe drives (skipped where there are none)."""

from __future__ import annotations

import glob
import os
import re
import shutil

import pytest

from appliance.spdk_rpc.drives import NvmeCli

CONTROLLERS = sorted(p for p in glob.glob("/dev/nvme*") if re.fullmatch(r"/dev/nvme\d+", p))

pytestmark = [
    pytest.mark.skipif(shutil.which("nvme") is None, reason="nvme-cli is not installed"),
    pytest.mark.skipif(not CONTROLLERS, reason="no NVMe drives on this machine (no /dev/nvme<N>)"),
]


def test_nvme_list_shows_every_namespace_device() -> None:
    namespaces = NvmeCli().list_namespaces()
    assert namespaces, "controllers exist but nvme list shows no namespaces"
    for ns in namespaces:
        assert os.path.exists(ns.device_path), ns
        assert ns.sector_size in (512, 4096) and ns.physical_size == ns.maximum_lba * ns.sector_size


@pytest.mark.parametrize("device", CONTROLLERS)
def test_identify_and_health_of_each_controller(device: str) -> None:
    nvme = NvmeCli()
    ident = nvme.id_ctrl(device)
    assert ident.serial_number and ident.model_number and ident.nn >= 1
    assert re.fullmatch(r"\d+\.\d+\.\d+", ident.version)
    smart = nvme.smart_log(device)
    assert -40 < smart.temperature_celsius < 120
    assert 0 <= smart.available_spare <= 100 and smart.power_on_hours >= 0
