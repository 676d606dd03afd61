"""``make cluster``: VoiceClaw scaled out on loopback, the way several boxes would run it.

``python deploy/cluster.py start|stop|status`` (``make cluster`` / ``make cluster-stop``)
starts, each as its own process with its pid and log under the cluster dir:

* Redis (Debian's ``redis-server``): Reflex's state manager and token manager;
* a throwaway PostgreSQL 15 cluster (``initdb`` into the cluster dir): the database,
  migrated at start-up by each worker (:mod:`voiceclaw_app.db.migrate`), and the
  shared audio store (:mod:`voiceclaw_app.pipeline.audio_store_db`);
* N VoiceClaw backend workers (``reflex run --env prod --backend-only``, one Granian
  worker each, on consecutive ports), all with ``REFLEX_REDIS_URL`` and
  ``VOICECLAW_DATABASE_URL=postgresql+psycopg://...``;
* Caddy terminating TLS at ``https://localhost:8443`` with its own local CA (``tls
  internal``), serving the frontend (built once, static) and balancing the backend
  paths (``/_event``, ``/ws/voice``, ``/audio/``...) across the workers, WebSocket
  upgrades included, with both of a tab's sockets on one worker (README, "Scaling out").

Everything is configurable by environment variable (tests use their own dir and ports):
``VOICECLAW_CLUSTER_DIR`` (default ``data/cluster``), ``VOICECLAW_CLUSTER_WORKERS`` (3),
``VOICECLAW_CLUSTER_PORT`` (first worker port, 3801), ``VOICECLAW_CLUSTER_HTTPS_PORT``
(8443), ``VOICECLAW_CLUSTER_REDIS_PORT`` (3880), ``VOICECLAW_CLUSTER_PG_PORT`` (3881); the
tests use their own (3890, 3891, workers from 3811, https 3843: see tests/test_cluster.py).
Provider settings (``VOICECLAW_LLM_BASE_URL``...) are passed through to the workers.

The classes are importable (``from deploy.cluster import Cluster``): the cluster and
fault tests and the load benchmark start exactly what ``make cluster`` starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python deploy/cluster.py` from the Makefile
    sys.path.insert(0, str(ROOT))

from voiceclaw_app.bench.browser import node_env  # noqa: E402  (Node 22 on PATH, npm, no OPENAI_BASE_URL)
from voiceclaw_app.bench.cpu import all_pids, stat_fields  # noqa: E402  (/proc, read one way)
PG_BIN = Path(os.environ.get("VOICECLAW_PG_BIN", "/usr/lib/postgresql/15/bin"))
CADDYFILE_TEMPLATE = Path(__file__).with_name("Caddyfile.template")


def missing_tools() -> str | None:
    """What the cluster needs and this machine lacks (in words), or None."""
    for tool in ("redis-server", "caddy"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (make test installs it)"
    if not (PG_BIN / "initdb").exists():
        return "PostgreSQL 15 binaries not found"
    return None


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"  # a zombie child of ours counts as gone


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every live, non-zombie process (/proc)."""
    table = {}
    for pid in all_pids():
        fields = stat_fields(pid)
        if fields is not None and fields[0] != "Z":
            table[pid] = (int(fields[1]), int(fields[2]))
    return table


def _tree(root: int, table: dict[int, tuple[int, int]]) -> list[int]:
    """``root`` and its descendants (PostgreSQL's backends, a worker's helpers)."""
    if root not in table:
        return []
    found, frontier = [root], {root}
    while frontier:
        children = [pid for pid, (ppid, _) in table.items() if ppid in frontier and pid not in found]
        found += children
        frontier = set(children)
    return found


def _wait(check, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.25)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    raise RuntimeError(f"{what} did not come up within {timeout_s:.0f} s{tail}")


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: run its binaries as the ``postgres`` user then."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


@dataclasses.dataclass
class Postgres:
    """A throwaway PostgreSQL cluster in ``root`` on a loopback port (no password: trust)."""

    root: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "pg"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://voiceclaw@127.0.0.1:{self.port}/voiceclaw"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*_as_postgres_user(), *args], capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fresh = not (self.data / "PG_VERSION").exists()
        if fresh:
            self.data.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(self.data, "postgres", "postgres")
                os.chmod(self.data, 0o700)
            self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "voiceclaw", "--auth=trust", "-E", "UTF8", "--no-instructions")
        self.resume()
        if fresh:
            self._run(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "voiceclaw", "voiceclaw")

    def resume(self) -> None:
        """Start the server on existing data (also: back after :meth:`halt`)."""
        sock_dir = self.data  # unix sockets inside the data dir, not /var/run
        opts = f"-p {self.port} -k {sock_dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.data / "server.log"), "-w", "-t", "60", "start")

    def halt(self) -> None:
        """Stop at once (connections are cut, as in an outage); :meth:`resume` brings it back."""
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop", check=False)

    def running(self) -> bool:
        return _port_open(self.port)


@dataclasses.dataclass
class Redis:
    """Debian's redis-server on a loopback port, with an append-only file in ``root``."""

    root: Path
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.root / "redis.pid"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--daemonize", "yes",
             "--pidfile", str(self.pidfile), "--logfile", str(self.root / "redis.log"), "--dir", str(self.root),
             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
            check=True, capture_output=True, timeout=30,
        )
        _wait(lambda: _port_open(self.port), 20, "redis", self.root / "redis.log")

    def stop(self) -> None:
        """Shut down (the append-only file keeps Reflex state for the next start)."""
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown"], capture_output=True, timeout=30)
        deadline = time.monotonic() + 10
        while _port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def restart(self) -> None:
        self.stop()
        self.start()


def clear_disk_states() -> None:
    """Empty the checkout's ``.states/`` (single-process runs leave pickled states there)
    before several workers start: each ``reflex run`` deletes those files at start-up,
    and workers starting together race on the same files (one gets FileNotFoundError and
    dies). The cluster's state lives in Redis; nothing there is needed."""
    for path in (ROOT / ".states").glob("*.pkl"):
        path.unlink(missing_ok=True)


@dataclasses.dataclass
class Cluster:
    """What ``make cluster`` runs; ``start()`` / ``stop()``; pids and logs under ``root``."""

    root: Path = dataclasses.field(default_factory=lambda: Path(os.environ.get("VOICECLAW_CLUSTER_DIR", ROOT / "data" / "cluster")).resolve())
    workers: int = dataclasses.field(default_factory=lambda: _env_int("VOICECLAW_CLUSTER_WORKERS", 3))
    first_port: int = dataclasses.field(default_factory=lambda: _env_int("VOICECLAW_CLUSTER_PORT", 3801))
    https_port: int = dataclasses.field(default_factory=lambda: _env_int("VOICECLAW_CLUSTER_HTTPS_PORT", 8443))
    redis_port: int = dataclasses.field(default_factory=lambda: _env_int("VOICECLAW_CLUSTER_REDIS_PORT", 3880))
    pg_port: int = dataclasses.field(default_factory=lambda: _env_int("VOICECLAW_CLUSTER_PG_PORT", 3881))
    extra_env: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.redis = Redis(self.root / "redis", self.redis_port)
        self.postgres = Postgres(self.root, self.pg_port)

    # -- addresses ---------------------------------------------------------------
    @property
    def url(self) -> str:
        """127.0.0.1, not localhost: see deploy/Caddyfile.template (localhost redirects here)."""
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def ws_url(self) -> str:
        return f"wss://127.0.0.1:{self.https_port}"

    @property
    def ports(self) -> list[int]:
        return [self.first_port + i for i in range(self.workers)]

    @property
    def ca_cert(self) -> Path:
        """Caddy's local root CA (what a client trusts to verify https://localhost)."""
        return self.root / "caddy" / "pki" / "authorities" / "local" / "root.crt"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_cert))

    def worker_env(self) -> dict[str, str]:
        env = node_env()
        env["REFLEX_TELEMETRY_ENABLED"] = "false"
        env.update({
            "REFLEX_REDIS_URL": self.redis.url,
            "VOICECLAW_DATABASE_URL": self.postgres.url,
            "VOICECLAW_DATA_DIR": str(self.root / "data"),
            "VOICECLAW_MODEL_DIR": env.get("VOICECLAW_MODEL_DIR", str(ROOT / "data" / "models")),
            "REFLEX_API_URL": self.url,
            "GRANIAN_WORKERS": "1",  # one process per worker: the balancer spreads the load
        })
        env.update(self.extra_env)
        return env

    # -- lifecycle ---------------------------------------------------------------
    def start(self, build: bool = True) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.redis.start()
            self.postgres.start()
            if build:
                self.build_frontend()
            else:  # sockets only (the load benchmark), or a frontend built before
                (self.root / "www").mkdir(exist_ok=True)
            clear_disk_states()
            for i in range(self.workers):
                self.start_worker(i)
            self.start_caddy()
            for i in range(self.workers):
                self.wait_worker(i)
            _wait(lambda: self._get(self.url + "/ping") == 200, 60, "caddy", self.root / "caddy.log")
        except BaseException:
            self.stop()
            raise
        (self.root / "cluster.json").write_text(json.dumps({"url": self.url, "workers": self.ports, "redis": self.redis.url, "database": self.postgres.url}, indent=1))

    def build_frontend(self) -> None:
        """Compile and export the static frontend once, pointed at the proxy's URL."""
        env = self.worker_env()
        log = self.root / "build.log"
        for attempt in (1, 2):  # the prerender step times out now and then on a busy 2-core box
            with open(log, "ab") as fh:
                proc = subprocess.run(["reflex", "export", "--frontend-only", "--no-zip", "--env", "prod"], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=600)
            if proc.returncode == 0:
                break
        else:
            raise RuntimeError(f"frontend build failed twice, see {log}")
        www = self.root / "www"
        shutil.rmtree(www, ignore_errors=True)
        shutil.copytree(ROOT / ".web" / "build" / "client", www)

    def start_worker(self, i: int) -> None:
        port = self.ports[i]
        log = self.root / f"worker-{i}.log"
        fh = open(log, "ab")
        proc = subprocess.Popen(
            ["reflex", "run", "--env", "prod", "--backend-only", "--backend-host", "127.0.0.1", "--backend-port", str(port), "--loglevel", "info"],
            cwd=ROOT, env=self.worker_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
        fh.close()
        (self.root / f"worker-{i}.pid").write_text(str(proc.pid))

    def wait_worker(self, i: int, timeout_s: float = 180) -> None:
        port = self.ports[i]
        _wait(lambda: self._get(f"http://127.0.0.1:{port}/ping") == 200, timeout_s, f"worker {i} (port {port})", self.root / f"worker-{i}.log")

    def worker_pids(self, i: int) -> list[int]:
        """The worker's process group: the reflex CLI and its Granian processes."""
        pidfile = self.root / f"worker-{i}.pid"
        if not pidfile.exists():
            return []
        pgid = int(pidfile.read_text())
        return [pid for pid, (_ppid, group) in _process_table().items() if group == pgid]

    def processes(self) -> dict[str, list[int]]:
        """Every live process this cluster runs, by part (the load benchmark's CPU figures)."""
        table = _process_table()

        def tree(pidfile: Path) -> list[int]:
            try:
                return _tree(int(pidfile.read_text().split()[0]), table)
            except (OSError, ValueError, IndexError):
                return []

        return {
            "workers": [p for i in range(self.workers) for p in self.worker_pids(i)],
            "proxy": tree(self.root / "caddy.pid"),
            "redis": tree(self.redis.pidfile),
            "postgres": tree(self.postgres.data / "postmaster.pid"),
        }

    def kill_worker(self, i: int, sig: int = signal.SIGKILL) -> None:
        """SIGKILL (by default) every process of worker ``i``: a crash, no clean-up."""
        pidfile = self.root / f"worker-{i}.pid"
        if pidfile.exists():
            try:
                os.killpg(int(pidfile.read_text()), sig)
            except ProcessLookupError:
                pass

    def stop_worker(self, i: int) -> None:
        pidfile = self.root / f"worker-{i}.pid"
        if not pidfile.exists():
            return
        pgid = int(pidfile.read_text())
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pidfile.unlink(missing_ok=True)
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.worker_pids(i):
            time.sleep(0.2)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pidfile.unlink(missing_ok=True)

    def caddyfile(self) -> str:
        upstreams = " ".join(f"127.0.0.1:{p}" for p in self.ports)
        text = CADDYFILE_TEMPLATE.read_text()
        for key, value in {"HTTPS_PORT": str(self.https_port), "HTTP_PORT": str(self.redis_port + 9),
                           "ADMIN": f"127.0.0.1:{self.redis_port + 8}", "UPSTREAMS": upstreams,
                           "WWW": str(self.root / "www"), "STORAGE": str(self.root / "caddy")}.items():
            text = text.replace("{$" + key + "}", value)
        return text

    def start_caddy(self) -> None:
        path = self.root / "Caddyfile"
        path.write_text(self.caddyfile())
        log = self.root / "caddy.log"
        fh = open(log, "ab")
        env = dict(os.environ, HOME=str(self.root), XDG_DATA_HOME=str(self.root), XDG_CONFIG_HOME=str(self.root))
        proc = subprocess.Popen(["caddy", "run", "--config", str(path), "--adapter", "caddyfile"], env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        fh.close()
        (self.root / "caddy.pid").write_text(str(proc.pid))
        _wait(lambda: self.ca_cert.exists() and _port_open(self.https_port), 60, "caddy", log)

    def stop(self) -> None:
        """Stop everything this cluster started (whatever is still running)."""
        pidfile = self.root / "caddy.pid"
        if pidfile.exists():
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass
            pidfile.unlink(missing_ok=True)
        for i in range(max(self.workers, len(list(self.root.glob("worker-*.pid"))))):
            self.stop_worker(i)
        self.postgres.stop()
        if self.redis.pidfile.exists():
            self.redis.stop()
        (self.root / "cluster.json").unlink(missing_ok=True)

    def status(self) -> dict:
        return {
            "url": self.url,
            "redis": _port_open(self.redis_port),
            "postgres": _port_open(self.pg_port),
            "workers": {p: _port_open(p) for p in self.ports},
            "caddy": _port_open(self.https_port),
        }

    def _get(self, url: str) -> int:
        ctx = self.ssl_context() if url.startswith("https") else None
        with urllib.request.urlopen(url, timeout=3, context=ctx) as r:
            return r.status


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    cmd = args[0] if args else "status"
    cluster = Cluster()
    if cmd == "start":
        cluster.start()
        print(f"VoiceClaw cluster up: {cluster.url} (workers on {', '.join(map(str, cluster.ports))}; "
              f"Redis {cluster.redis.url}; PostgreSQL {cluster.postgres.url}; logs in {cluster.root}). "
              f"Caddy's local CA: {cluster.ca_cert}. Stop with `make cluster-stop`.")
        return 0
    if cmd == "stop":
        cluster.stop()
        print("VoiceClaw cluster stopped")
        return 0
    if cmd == "status":
        print(json.dumps(cluster.status(), indent=1))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
