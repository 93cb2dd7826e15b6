"""Boot Debian's own kernel under QEMU (TCG) with a tiny initramfs, to test against Linux's NVMe/TCP.

The guest is the reference peer for interop: its ``nvme-tcp`` host connects to the soft target
through QEMU's user network (the host's loopback is 10.0.2.2 in the guest) and its ``nvmet-tcp``
target is forwarded to a host port for the Kahu host. The initramfs is assembled from this
machine's Debian binaries (busybox-static, nvme-cli and its libraries, kernel modules) and cached
under ``tests/.cache`` keyed by a hash of its inputs; the test's own shell script is appended as a
second cpio archive, so one cached base serves every test.

Inside the guest script, these shell functions are available (defined by ``/init``):

- ``step NAME CMD...``: runs CMD, its output framed by ``KAHU-STEP-BEGIN NAME`` and
  ``KAHU-STEP NAME rc=N``; returns CMD's status.
- ``marker TEXT``: prints ``KAHU-MARK TEXT`` (e.g. to say "target ready").
- ``wait_host NAME``: prints ``KAHU-WAIT NAME`` and blocks until the host sends a line on the
  serial console (:meth:`Guest.send_line`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ports import free_port

CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache"
QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
NVME_CLI = "/usr/sbin/nvme"
GUEST_IP = "10.0.2.15"
HOST_IP = "10.0.2.2"  # the host's loopback as seen from the guest (QEMU user network)
GUEST_HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6b61687a-0000-4000-8000-00000000beef"
GUEST_HOSTID = "6b61687a-0000-4000-8000-00000000beef"
# Module names for ``modprobe --show-depends``; their dependencies come along in load order.
MODULES = ("virtio_pci", "virtio_net", "configfs", "loop", "crc32c_generic", "nvme-tcp", "nvmet", "nvmet-tcp")

STEP_RE = re.compile(r"^KAHU-STEP (\S+) rc=(\d+)$")
BEGIN_RE = re.compile(r"^KAHU-STEP-BEGIN (\S+)$")
ANSI_RE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|.)")  # the firmware's screen resets precede the first line

INIT = r"""#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
echo "KAHU-BOOT uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /etc/kahu-modules); do
    insmod "$m" 2>/dev/null || [ -d "/sys/module/$(basename "$m" .ko | tr - _)" ] \
        || echo "KAHU-MODULE-FAILED $m"
done
mount -t configfs configfs /sys/kernel/config
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2 \
    || echo "KAHU-NET-FAILED"
step() {
    _name=$1; shift
    echo "KAHU-STEP-BEGIN $_name"
    "$@" 2>&1
    _rc=$?
    echo "KAHU-STEP $_name rc=$_rc"
    [ $_rc -eq 0 ] || _failed=1
    return $_rc
}
marker() { echo "KAHU-MARK $*"; }
wait_host() { echo "KAHU-WAIT $1"; read -r _reply; }
echo "KAHU-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
. /kahu/script.sh
echo "KAHU-DONE uptime=$(cut -d' ' -f1 /proc/uptime)"
[ -z "$_failed" ] || dmesg | tail -n 40 | sed 's/^/KAHU-DMESG /'
poweroff -f
"""


# ---------------------------------------------------------------- environment


def find_kernel() -> tuple[Path, str] | None:
    """The newest /boot/vmlinuz-* that has its modules installed, and its release string."""

    for image in sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        release = image.name.removeprefix("vmlinuz-")
        if Path("/lib/modules", release).is_dir() and os.access(image, os.R_OK):
            return image, release
    return None


def require_guest() -> tuple[Path, str]:
    """Skip the calling test, with the reason, when the guest cannot be booted here."""
    for tool in (QEMU, "modprobe", "ldd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found (install it via scripts/setup)")
    for binary in (BUSYBOX, NVME_CLI):
        if not os.access(binary, os.X_OK):
            pytest.skip(f"{binary} not found (busybox-static / nvme-cli, see scripts/setup)")
    kernel = find_kernel()
    if kernel is None:
        pytest.skip("no readable /boot/vmlinuz-* with modules in /lib/modules (linux-image-amd64)")
    return kernel


# ---------------------------------------------------------------- initramfs


class Cpio:
    """A minimal writer for the "newc" cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._ino = 1

    def _entry(self, name: str, mode: int, body: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = (self._ino, mode, 0, 0, 1, 0, len(body), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        self._ino += 1
        self.data += b"070701" + b"".join(b"%08x" % f for f in fields) + name.encode() + b"\0"
        self.data += b"\0" * (-len(self.data) % 4)
        self.data += body
        self.data += b"\0" * (-len(self.data) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, body: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, body)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.data)


def module_paths(release: str, names: Iterable[str] = MODULES) -> list[str]:
    """Module files in load order (dependencies first, each once), from modprobe's own resolver."""
    ordered: list[str] = []
    for name in names:
        out = subprocess.run(
            ["modprobe", "-S", release, "--show-depends", name],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        for line in out.splitlines():
            parts = line.split()
            if parts[:1] == ["insmod"] and parts[1] not in ordered:
                ordered.append(parts[1])
    return ordered


def shared_libraries(binary: str) -> list[str]:
    """The libraries and dynamic loader ``ldd`` says BINARY needs."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True, timeout=30).stdout
    return [p for p in re.findall(r"(/\S+)", out) if not p.startswith("(")]


def _guest_files(release: str) -> dict[str, str]:
    """Guest path -> host path of every regular file the base initramfs carries."""
    files = {"/bin/busybox": BUSYBOX, "/bin/nvme": NVME_CLI}
    for lib in shared_libraries(NVME_CLI):
        files[lib] = lib
    for ko in module_paths(release):
        if ko.endswith((".xz", ".zst", ".gz")):
            raise RuntimeError(f"{ko}: compressed module; busybox insmod cannot load it")
        files[ko] = ko
    return files


def build_base_initramfs(release: str) -> Path:
    """The cached base archive (init, busybox, nvme-cli, modules); built when its inputs changed."""
    files = _guest_files(release)
    modules = [g for g in files if g.endswith(".ko")]
    digest = hashlib.sha256(INIT.encode() + release.encode() + GUEST_HOSTNQN.encode())
    for guest, host in sorted(files.items()):
        digest.update(guest.encode() + b"\0" + Path(host).read_bytes())
    digest.update("\n".join(modules).encode())
    path = CACHE_DIR / f"initramfs-{release}-{digest.hexdigest()[:16]}.cpio"
    if path.exists():
        return path

    archive = Cpio()
    dirs = {"/bin", "/dev", "/proc", "/sys", "/tmp", "/etc", "/etc/nvme", "/kahu", "/root"}
    for guest in files:
        parent = Path(guest).parent
        while str(parent) != "/":
            dirs.add(str(parent))
            parent = parent.parent
    for d in sorted(dirs):
        archive.directory(d.lstrip("/"))
    archive.chardev("dev/console", 5, 1)
    for guest, host in sorted(files.items()):
        archive.file(guest.lstrip("/"), Path(host).read_bytes(), 0o755)
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True, timeout=30)
    for applet in applets.stdout.split():
        if applet not in ("busybox", "nvme"):
            archive.symlink(f"bin/{applet}", "busybox")
    archive.file("init", INIT.encode(), 0o755)
    archive.file("etc/kahu-modules", "\n".join(modules).encode() + b"\n")
    archive.file("etc/nvme/hostnqn", GUEST_HOSTNQN.encode() + b"\n")
    archive.file("etc/nvme/hostid", GUEST_HOSTID.encode() + b"\n")

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=CACHE_DIR, prefix=".initramfs-")
    with os.fdopen(fd, "wb") as f:
        f.write(archive.finish())
    os.replace(tmp, path)  # atomic: a concurrent run sees the old or the whole new file
    for stale in CACHE_DIR.glob(f"initramfs-{release}-*.cpio"):
        if stale != path:
            stale.unlink(missing_ok=True)  # built from inputs that have since changed
    return path


def script_archive(script: str, files: dict[str, bytes]) -> bytes:
    """The per-test overlay: the guest script at /kahu/script.sh and FILES (path under /kahu)."""
    archive = Cpio()
    archive.file("kahu/script.sh", script.encode(), 0o755)
    for name, body in files.items():
        archive.file(f"kahu/{name}", body)
    return archive.finish()


# ---------------------------------------------------------------- QEMU runner


@dataclass
class Step:
    name: str
    rc: int
    output: str


@dataclass
class GuestResult:
    console: list[str]
    steps: dict[str, Step] = field(default_factory=dict)
    done: bool = False
    boot_seconds: float | None = None
    total_seconds: float = 0.0

    def rc(self, name: str) -> int:
        return self.steps[name].rc

    def output(self, name: str) -> str:
        return self.steps[name].output

    def explain(self) -> str:
        """The console log, for assertion messages."""
        return "\n".join(self.console)


def parse_console(lines: list[str]) -> dict[str, Step]:
    """Per-step output and return code from the ``KAHU-STEP`` frames on the console."""
    steps: dict[str, Step] = {}
    current: str | None = None
    body: list[str] = []
    for line in lines:
        if m := BEGIN_RE.match(line):
            current, body = m.group(1), []
        elif (m := STEP_RE.match(line)) and m.group(1) == current:
            steps[current] = Step(current, int(m.group(2)), "\n".join(body))
            current = None
        elif current is not None:
            body.append(line)
    return steps


class Guest:
    """One QEMU run of the Linux guest; use as a context manager so QEMU is always killed."""

    def __init__(
        self,
        script: str,
        *,
        files: dict[str, bytes] | None = None,
        forward: Iterable[int] = (),
        smp: int = 2,
        memory_mb: int = 512,
    ):
        self.kernel, self.release = require_guest()
        self.script = script
        self.files = files or {}
        self.ports = {guest_port: free_port() for guest_port in forward}
        self.smp = smp
        self.memory_mb = memory_mb
        self.lines: list[str] = []
        self.boot_seconds: float | None = None
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._cursor = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._started = 0.0

    def host_port(self, guest_port: int) -> int:
        """The 127.0.0.1 port QEMU forwards to GUEST_PORT in the guest."""
        return self.ports[guest_port]

    def __enter__(self) -> Guest:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def command(self, initrd: Path) -> list[str]:
        fwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for g, h in self.ports.items())
        return [
            QEMU,
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            str(self.smp),
            "-m",
            str(self.memory_mb),
            "-nographic",
            "-no-reboot",
            "-kernel",
            str(self.kernel),
            "-initrd",
            str(initrd),
            "-append",
            "console=ttyS0 quiet panic=-1 oops=panic",
            "-netdev",
            f"user,id=n0{fwd}",
            "-device",
            "virtio-net-pci,netdev=n0",
        ]

    def start(self) -> None:
        base = build_base_initramfs(self.release)
        self._tmp = tempfile.TemporaryDirectory(prefix="kahu-guest-")
        initrd = Path(self._tmp.name, "initrd.cpio")
        with initrd.open("wb") as out, base.open("rb") as src:
            shutil.copyfileobj(src, out)
            out.write(script_archive(self.script, self.files))
        self._started = time.monotonic()
        self._proc = subprocess.Popen(
            self.command(initrd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        threading.Thread(target=self._read, args=(self._proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = ANSI_RE.sub("", raw.decode(errors="replace")).rstrip("\r\n").replace("\r", "")
            cut = line.find("KAHU-")  # a marker may follow firmware or kernel text on the same line
            if cut > 0:
                self._queue.put(line[:cut])
                line = line[cut:]
            self._queue.put(line)
        self._queue.put(None)

    def _next_line(self, deadline: float) -> str | None:
        """The next console line; None at EOF. TimeoutError at the deadline."""
        if self._cursor < len(self.lines):
            self._cursor += 1
            return self.lines[self._cursor - 1]
        try:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(self._tail()) from None
        if line is None:
            self._queue.put(None)  # stay at EOF for later callers
            return None
        self.lines.append(line)
        self._cursor += 1
        if line.startswith("KAHU-BOOT") and self.boot_seconds is None:
            self.boot_seconds = time.monotonic() - self._started
            print(f"linux_guest: kernel booted to /init in {self.boot_seconds:.1f}s ({line})")
        return line

    def _tail(self, n: int = 60) -> str:
        return "guest console (last lines):\n" + "\n".join(self.lines[-n:])

    def expect(self, text: str, timeout: float = 90.0) -> str:
        """Wait for a console line starting with TEXT (after what earlier calls consumed)."""
        deadline = time.monotonic() + timeout
        while (line := self._next_line(deadline)) is not None:
            if line.startswith(text):
                return line
        raise AssertionError(f"guest ended before {text!r}\n{self._tail()}")

    def send_line(self, text: str) -> None:
        """Type a line on the guest's serial console (releases ``wait_host``)."""
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(text.encode() + b"\n")
        self._proc.stdin.flush()

    def wait(self, timeout: float = 120.0) -> GuestResult:
        """Run to the end of the guest script (QEMU exits after poweroff); parse the console."""
        deadline = time.monotonic() + timeout
        while self._next_line(deadline) is not None:
            pass
        assert self._proc is not None
        self._proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        done = any(line.startswith("KAHU-DONE") for line in self.lines)
        return GuestResult(
            console=list(self.lines),
            steps=parse_console(self.lines),
            done=done,
            boot_seconds=self.boot_seconds,
            total_seconds=time.monotonic() - self._started,
        )

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)
            if self._proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self._proc.stdin.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def run_guest(script: str, *, files: dict[str, bytes] | None = None, timeout: float = 120.0) -> GuestResult:
    """Boot the guest, run SCRIPT, and return the parsed result (QEMU is gone afterwards)."""
    with Guest(script, files=files) as guest:
        return guest.wait(timeout)
