"""The YAML config (errors name the bad field) and `kahu target serve` as a real process."""

from __future__ import annotations

import copy
import signal
from pathlib import Path

import pytest
from conftest import TEST_NQN, run
from nvme_wire import open_controller, open_queues
from ports import free_port

from appliance.nvmeof.spec import DISCOVERY_NQN, LogPage
from appliance.nvmeof.target.config import load_target_config, parse_size, parse_target_config
from appliance.nvmeof.target.model import ConfigError

GOOD = {
    "rpc_socket": "/tmp/kahu-test.sock",
    "transport": {"max_io_size": 65536, "in_capsule_data_size": 8192, "c2h_success": False},
    "subsystems": [
        {"nqn": TEST_NQN, "namespaces": [{"malloc": "1MiB"}, {"malloc": 4096, "block_size": 4096}]}
    ],
}


def test_good_config_parses() -> None:
    cfg = parse_target_config(GOOD)
    assert cfg.rpc_socket == "/tmp/kahu-test.sock"
    assert (cfg.transport.max_io_size, cfg.transport.in_capsule_data_size, cfg.transport.c2h_success) == (
        65536, 8192, False
    )  # fmt: skip
    assert [ns.size for ns in cfg.subsystems[0].namespaces] == [1 << 20, 4096]
    assert parse_size("64MiB", "x") == parse_size("64M", "x") == 64 << 20 and parse_size("1GB", "x") == 10**9


def ns(i: int):
    return lambda c: c["subsystems"][0]["namespaces"][i]


def sub(c):
    return c["subsystems"][0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(bogus=1), "config.bogus: unknown key"),
        (lambda c: c["transport"].update(max_io_size="big"), "transport.max_io_size: expected an integer"),
        (lambda c: c["transport"].update(num_cqe=4), "transport.num_cqe: unknown key"),
        (lambda c: sub(c).update(nqn="bad"), "subsystems[0]: NQN must start with 'nqn.'"),
        (lambda c: sub(c).pop("nqn"), "subsystems[0].nqn: required"),
        (lambda c: ns(1)(c).update(malloc="lots"), "subsystems[0].namespaces[1].malloc"),
        (lambda c: ns(0)(c).update(file="/x"), "subsystems[0].namespaces[0]: needs exactly"),
        (lambda c: ns(0)(c).update(block_size=1000), "namespaces[0].block_size"),
        (lambda c: ns(0)(c).update(uuid="not-a-uuid"), "namespaces[0].uuid: not a UUID"),
        (lambda c: sub(c).update(listeners=[{"traddr": "::1", "trsvcid": "x"}]), "listeners[0].trsvcid"),
        (lambda c: c["subsystems"].append({"nqn": TEST_NQN}), "subsystems[1].nqn: duplicate"),
        (lambda c: sub(c).update(allow_any_host="yes"), "subsystems[0].allow_any_host"),
    ],
)
def test_config_errors_name_the_field(change, message) -> None:
    doc = copy.deepcopy(GOOD)
    change(doc)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_target_config(doc)


def test_file_namespace_created_sparse_and_size_checked(soft_target, tmp_path: Path) -> None:
    image = tmp_path / "sub" / "ns.img"
    doc = {"subsystems": [{"nqn": TEST_NQN, "namespaces": [{"file": str(image), "size": "4MiB"}]}]}

    async def scenario() -> None:
        async with soft_target(doc) as t:
            assert t.server.target.subsystem(TEST_NQN).namespaces[1].bdev.num_blocks == 8192
        assert image.stat().st_size == 4 << 20 and image.stat().st_blocks == 0  # sparse
        doc["subsystems"][0]["namespaces"][0]["size"] = "8MiB"
        with pytest.raises(ConfigError, match=r"subsystems\[0\]\.namespaces\[0\]\.size: .* already exists"):
            async with soft_target(doc):
                pass

    run(scenario())


def test_load_rejects_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("subsystems: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_target_config(path)


def test_kahu_target_serve_runs_until_sigterm(kahu_serve, tmp_path: Path) -> None:
    io_port, disc_port = free_port(), free_port()
    served = kahu_serve(
        f"""
transport: {{max_io_size: 131072, in_capsule_data_size: 4096}}
discovery:
  listeners: [{{traddr: 127.0.0.1, trsvcid: "{disc_port}"}}]
subsystems:
  - nqn: {TEST_NQN}
    serial_number: KAHUTEST0001
    allow_any_host: true
    listeners: [{{traddr: 127.0.0.1, trsvcid: "{io_port}"}}]
    namespaces:
      - {{file: {tmp_path / "ns1.img"}, size: 4MiB, block_size: 512}}
""",
        listeners=2,
    )
    assert sorted(served.addresses) == sorted([("127.0.0.1", io_port), ("127.0.0.1", disc_port)])

    async def scenario() -> None:
        d = await open_controller(disc_port, DISCOVERY_NQN)
        assert (await d.get_log(LogPage.DISCOVERY, 1024)).data[8] == 2  # NUMREC: subsystem + discovery
        admin, io = await open_queues(io_port, TEST_NQN)
        assert (await io.write(1, 5, b"k" * 512, 512)).status == 0
        assert (await io.read(1, 5, 1, 512)).data == b"k" * 512
        for q in (io, admin, d):
            await q.close()

    run(scenario())
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=10) == 0
    assert (tmp_path / "ns1.img").read_bytes()[5 * 512 : 6 * 512] == b"k" * 512
