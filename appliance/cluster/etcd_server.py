"""Real etcd member processes: start a cluster, kill and restart members, stop it, find its leader.

Synchronous on purpose (``subprocess.Popen``, ``urllib``): it serves a sync supervisor and pytest
fixtures, neither of which has an event loop to hand. Readiness is etcd's own ``GET /health``, which
is true only once the member has a leader, so a started cluster can take writes at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.procs import stop_process, tied_to_parent

ETCD_BINARY = "etcd"
POLL_INTERVAL = 0.05  # polling a foreign process's /health: there is nothing to await on
LOG_TAIL_BYTES = 3000
QUOTA_BACKEND_BYTES = 2 * 1024**3
SNAPSHOT_COUNT = 10000
COMPACTION_RETENTION = 100000  # revisions kept: enough history for a watcher to resume after a hiccup
PROGRESS_NOTIFY = "1s"  # idle watch streams hear from their member this often (etcd.WATCH_SILENCE)


class EtcdStartError(RuntimeError):
    """A member exited or never became healthy; the message carries the tail of its log."""


@dataclass(frozen=True)
class EtcdMemberSpec:
    name: str  # "etcd1"
    host: str  # address it listens on for clients and peers, e.g. "10.77.0.11" or "127.0.0.1"
    data_dir: Path
    client_port: int = 2379
    peer_port: int = 2380
    wrap: tuple[str, ...] = ()  # command prefix, e.g. ("ip", "netns", "exec", "kahu-123-ab12cd-n1")
    also_localhost: bool = False  # also listen for clients on 127.0.0.1:client_port (inside its netns)

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def listen_client_urls(self) -> list[str]:
        urls = [self.client_url]
        if self.also_localhost and self.host != "127.0.0.1":
            urls.append(f"http://127.0.0.1:{self.client_port}")
        return urls


def etcd_binary() -> str:
    """The etcd executable's path; a clear error when it is not installed."""
    path = shutil.which(ETCD_BINARY)
    if path is None:
        raise FileNotFoundError(f"{ETCD_BINARY!r} not found on PATH: install the Debian package etcd-server")
    return path


def _http_json(url: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    """GET (``body`` None) or POST JSON; raises OSError (URLError, HTTPError, timeouts) when unanswered."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.loads(response.read())
    if not isinstance(answer, dict):
        raise OSError(f"{url}: unexpected answer {answer!r:.80}")
    return answer


def member_healthy(client_url: str, timeout: float = 0.5) -> bool:
    """True when the member answers ``/health`` with true (it is up and has a leader)."""
    try:
        answer = _http_json(client_url + "/health", None, timeout)
    except (OSError, ValueError):  # refused, 503 "false", timed out, half-started garbage
        return False
    return str(answer.get("health")).lower() == "true"


def log_tail(path: Path, size: int = LOG_TAIL_BYTES) -> str:
    """The last ``size`` bytes of a log file (what an error message needs to be useful)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError as e:
        return f"(no log: {e})"


class EtcdCluster:
    """N members forming one cluster (initial-cluster from the specs, a fixed cluster token)."""

    def __init__(self, members: list[EtcdMemberSpec], log_dir: Path, token: str = "kahu",
                 heartbeat_ms: int = 100, election_ms: int = 1000):
        if not members:
            raise ValueError("an etcd cluster needs at least one member")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"etcd member names must be unique: {names}")
        self.members = list(members)
        self.log_dir = Path(log_dir)
        self.token = token
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self._specs = {m.name: m for m in members}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> EtcdCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- queries ---------------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def spec(self, name: str) -> EtcdMemberSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"no etcd member {name!r} (members: {list(self._specs)})") from None

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def running(self, name: str) -> bool:
        proc = self._procs.get(self.spec(name).name)
        return proc is not None and proc.poll() is None

    def pid(self, name: str) -> int | None:
        """The member's process id while it runs (``ip netns exec`` execs, so this is etcd itself)."""
        return self._procs[name].pid if self.running(name) else None

    def command(self, spec: EtcdMemberSpec) -> list[str]:
        """The member's full command line; with an existing data dir etcd ignores the initial-* flags."""
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        return [
            *spec.wrap, etcd_binary(),
            "--name", spec.name,
            "--data-dir", str(spec.data_dir),
            "--listen-client-urls", ",".join(spec.listen_client_urls),
            "--advertise-client-urls", spec.client_url,
            "--listen-peer-urls", spec.peer_url,
            "--initial-advertise-peer-urls", spec.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--auto-compaction-mode", "revision",
            "--auto-compaction-retention", str(COMPACTION_RETENTION),
            "--quota-backend-bytes", str(QUOTA_BACKEND_BYTES),
            "--snapshot-count", str(SNAPSHOT_COUNT),
            "--pre-vote",
            "--experimental-watch-progress-notify-interval", PROGRESS_NOTIFY,
            "--log-level", "warn",
            "--logger", "zap",
        ]  # fmt: skip

    def leader(self, timeout: float = 5.0) -> str | None:
        """The NAME of the current leader, or None when none is agreed within ``timeout``.

        Asks every running member for its status (``/v3/maintenance/status``, which carries each
        member's own id and its leader's id). A member counts as leader when it says so itself and
        a majority of the cluster names it, so neither survivors still naming a leader that was just
        killed nor a deposed leader that has not noticed yet are believed.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self._leader_once(deadline)
            if found is not None or time.monotonic() + POLL_INTERVAL >= deadline:
                return found
            time.sleep(POLL_INTERVAL)

    def _statuses(self, names: list[str], deadline: float) -> dict[str, dict[str, Any]]:
        """``/v3/maintenance/status`` of each running member named that answers before ``deadline``."""
        statuses = {}
        for name in names:
            left = deadline - time.monotonic()
            if not self.running(name) or left <= 0:
                continue
            with contextlib.suppress(OSError, ValueError):
                url = self.spec(name).client_url + "/v3/maintenance/status"
                statuses[name] = _http_json(url, {}, min(0.5, left))
        return statuses

    def _leader_once(self, deadline: float) -> str | None:
        claims: list[tuple[int, str, int]] = []  # (raft term, name, id) of members that say they lead
        votes: dict[int, int] = {}  # leader id -> how many members name it
        for name, status in self._statuses([m.name for m in self.members], deadline).items():
            own = int(status.get("header", {}).get("member_id", 0))
            leader = int(status.get("leader", 0))
            if leader:
                votes[leader] = votes.get(leader, 0) + 1
            if own and leader == own:
                claims.append((int(status.get("raftTerm", 0)), name, own))
        # The claimant in the newest term, once a majority names it: a deposed leader that has not
        # noticed yet, or survivors still naming one just killed, are not believed.
        if claims:
            _term, name, own = max(claims)
            if votes.get(own, 0) >= len(self.members) // 2 + 1:
                return name
        return None

    # --- control ---------------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        """Start every member that is not running; return once all are healthy (a leader exists).

        On failure the members this call started are stopped again, so nothing is left behind.
        """
        started = []
        try:
            for spec in self.members:
                if not self.running(spec.name):
                    self._launch(spec)
                    started.append(spec.name)
            self._wait_healthy([m.name for m in self.members], time.monotonic() + timeout)
        except BaseException:
            self._stop_names(started, 5.0)
            raise

    def start_member(self, name: str, timeout: float = 20.0) -> None:
        """(Re)start one member; return once it answers ``/health`` true (it rejoined and has a leader)."""
        spec = self.spec(name)
        if self.running(name):
            return
        self._launch(spec)
        try:
            self._wait_healthy([name], time.monotonic() + timeout)
        except BaseException:
            self._stop_names([name], 5.0)
            raise

    def kill_member(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (one that ends it) to a member and reap it; a member not running is left alone."""
        proc = self._procs.get(self.spec(name).name)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every member, wait (bounded), SIGKILL what is left; idempotent."""
        self._stop_names(list(self._procs), timeout)

    def _stop_names(self, names: list[str], timeout: float) -> None:
        """Followers first, all at once, then whoever says it leads, once it has seen them go.

        A leader asked to stop first hands leadership to a peer it thinks is connected; if that peer
        is stopping too (or stopped a moment ago, unnoticed) the hand-over stalls for etcd's request
        timeout, 5 s + two elections. So the leader goes last, after its metrics show no active peer
        (then it exits at once); it gets two election timeouts before SIGKILL in any case: with
        nobody left to lead there is nothing a graceful stop would preserve.
        """
        deadline = time.monotonic() + timeout
        running = [n for n in names if self.running(n)]
        leaders = set()
        if len(running) > 1:
            for name, status in self._statuses(running, time.monotonic() + 1.0).items():
                if int(status.get("leader", 0)) == int(status.get("header", {}).get("member_id", -1)):
                    leaders.add(name)
        for name in [n for n in names if n not in leaders]:
            if self.running(name):
                with contextlib.suppress(ProcessLookupError):
                    self._procs[name].terminate()
        for name in [n for n in names if n not in leaders and n in self._procs]:
            stop_process(self._procs[name], timeout=max(0.1, deadline - time.monotonic()))
        for name in sorted(leaders):
            grace = min(deadline, time.monotonic() + 2 * self.election_ms / 1000)
            self._wait_alone(name, grace)
            stop_process(self._procs[name], timeout=max(0.1, grace - time.monotonic()))

    def _wait_alone(self, name: str, deadline: float) -> None:
        """Until the member's ``etcd_network_active_peers`` gauges are all 0 (bounded polling)."""
        url = self.spec(name).client_url + "/metrics"
        while self.running(name) and (left := deadline - time.monotonic()) > 0:
            try:
                with urllib.request.urlopen(url, timeout=min(0.5, left)) as response:
                    metrics = response.read().decode(errors="replace")
            except OSError:
                return
            gauges = [line.rsplit(" ", 1)[-1] for line in metrics.splitlines()
                      if line.startswith("etcd_network_active_peers{")]  # fmt: skip
            if all(float(value) <= 0 for value in gauges):
                return
            time.sleep(POLL_INTERVAL)

    def _launch(self, spec: EtcdMemberSpec) -> None:
        spec.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # ETCD_* variables are flags too; the command line alone should say how a member runs.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        with self.log_path(spec.name).open("ab") as log:
            log.write(f"--- starting {spec.name} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            log.flush()
            self._procs[spec.name] = subprocess.Popen(
                self.command(spec), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,  # a terminal's Ctrl-C is for the owner, not etcd
                preexec_fn=tied_to_parent(),  # an owner that crashes takes its members with it
            )  # fmt: skip

    def _wait_healthy(self, names: list[str], deadline: float) -> None:
        waiting = list(names)
        while waiting:
            for name in list(waiting):
                for other in waiting:  # an exit is news before any answer: check them all each time
                    self._check_alive(other)
                left = deadline - time.monotonic()
                # a member still joining holds the request, so keep each try short
                if member_healthy(self.spec(name).client_url, timeout=max(0.05, min(0.25, left))):
                    waiting.remove(name)
            if not waiting:
                return
            if time.monotonic() >= deadline:
                tails = "\n".join(f"{self.log_path(n)} ends:\n{log_tail(self.log_path(n))}" for n in waiting)
                raise EtcdStartError(f"etcd members {waiting} not healthy in time\n{tails}")
            time.sleep(POLL_INTERVAL)

    def _check_alive(self, name: str) -> None:
        proc = self._procs[name]
        if proc.poll() is not None:
            raise EtcdStartError(
                f"etcd member {name} exited with status {proc.returncode}; "
                f"{self.log_path(name)} ends:\n{log_tail(self.log_path(name))}"
            )
