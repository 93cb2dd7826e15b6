"""The reconciler scenarios of tests/soft, against a real SPDK ``nvmf_tgt``/``spdk_tgt``.

Runs when one is named by $KAHU_SPDK_BIN or found on PATH; skipped with that reason otherwise. SPDK
runs with --no-huge and -u (no PCI) unless hugepages are reserved, so no drive is touched.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "soft"))  # the shared scenarios

from rpc_scenarios import (
    changed_drive_replaces_its_namespace,
    create_reapply_delta_connect_teardown,
    run_scenario,
)

from appliance.spdk_rpc.lifecycle import SPDK_BIN_ENV, SPDK_BINARIES, find_spdk_binary


def skip_reason() -> str | None:
    try:
        if find_spdk_binary() is None:
            return f"no SPDK target: ${SPDK_BIN_ENV} is unset and no {'/'.join(SPDK_BINARIES)} on PATH"
    except FileNotFoundError as e:
        return str(e)
    return None


pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


def test_spdk_create_reapply_delta_connect_teardown(tmp_path: Path) -> None:
    run_scenario(create_reapply_delta_connect_teardown, tmp_path, soft=False)


def test_spdk_changed_drive_replaces_its_namespace(tmp_path: Path) -> None:
    run_scenario(changed_drive_replaces_its_namespace, tmp_path, soft=False)
