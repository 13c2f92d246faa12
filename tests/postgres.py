"""A throw-away PostgreSQL cluster for the tests: pure stdlib, drives the server's own binaries.

    from tests.postgres import PostgresCluster, pg_available

    reason = pg_available()          # None, or why there is no usable PostgreSQL here
    with PostgresCluster() as pg:    # initdb + start on a free 127.0.0.1 port
        url = pg.create_database("mlflow")   # postgresql://test:<pw>@127.0.0.1:<port>/mlflow
        pg.kill()                    # SIGKILL the postmaster (and its backends): DB gone
        pg.restart()                 # same port, same data, same URLs
    # stopped and deleted here (also at interpreter exit if the with-block was skipped)

As root (tests and CI run as root; PostgreSQL refuses to) the cluster belongs to the
`postgres` system user: the temp dir is chown'ed to it and initdb/pg_ctl run through
`runuser -u postgres --` (else `su postgres -s /bin/sh -c`, else a plain setuid/setgid
fork). As any other user they run directly as that user. Clients (psql, pg_isready, your
code) always run as the caller and connect over TCP or the socket in the temp dir, so
/var/run/postgresql and any system cluster are never touched.

The temp dir is a fresh `tempfile.mkdtemp()` under a directory every user can traverse
(/tmp by default), never under pytest's tmp_path: /tmp/pytest-of-root is mode 0700, so the
postgres user cannot reach anything below it. The socket path also has to stay under
107 bytes, which deep tmp_path folders can exceed.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from urllib.parse import quote

from tests.servers import free_port

__all__ = ["PostgresCluster", "PostgresError", "find_bindir", "pg_available"]

NEEDED = ("initdb", "pg_ctl", "postgres", "pg_isready", "psql")
SERVER_USER = "postgres"  # who owns the cluster when we are root


class PostgresError(RuntimeError):
    """The cluster could not be made, started or used; the message ends with the server log."""


# --- finding the binaries ----------------------------------------------------------------


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def _candidate_bindirs() -> list[str]:
    dirs: list[str] = []
    if os.environ.get("PG_BINDIR"):
        dirs.append(os.environ["PG_BINDIR"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], check=False, capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                dirs.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    # Debian/Ubuntu keep the server out of PATH; the newest major version first.
    dirs += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    dirs += sorted(glob.glob("/usr/pgsql-*/bin"), key=_version_key, reverse=True)  # RHEL/PGDG
    initdb = shutil.which("initdb")
    if initdb:
        dirs.append(os.path.dirname(os.path.realpath(initdb)))
    return list(dict.fromkeys(dirs))


def find_bindir() -> Path | None:
    """The first directory holding all of initdb, pg_ctl, postgres, pg_isready and psql.

    `pg_config --bindir` alone is not enough: libpq-dev's pg_config exists without the server.
    """
    for d in _candidate_bindirs():
        if all(os.access(os.path.join(d, exe), os.X_OK) for exe in NEEDED):
            return Path(d)
    return None


def _switch_method() -> str | None:
    if shutil.which("runuser"):
        return "runuser"
    if shutil.which("su"):
        return "su"
    return "setuid"  # subprocess(user=, group=): always possible for root


def pg_available() -> str | None:
    """None when a throw-away cluster can be made here, else a one-line reason to skip."""
    if os.name != "posix":
        return "PostgreSQL test cluster needs a POSIX system"
    if find_bindir() is None:
        return (
            "PostgreSQL server binaries not found (need initdb, pg_ctl, postgres, pg_isready, psql "
            "via $PG_BINDIR, `pg_config --bindir`, /usr/lib/postgresql/*/bin or PATH; "
            "e.g. apt-get install postgresql)"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root and there is no '{SERVER_USER}' user to run the PostgreSQL server as"
    return None


# --- helpers -----------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    """The caller's environment minus PG* (PGDATA, PGHOST, PGPASSWORD ... would redirect us)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"  # a missing locale must not break initdb; the cluster is UTF8/C
    env.pop("LANG", None)
    return env


def _sql_literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _sql_ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _finalize(root: str, pid_file: str, runner: _Runner, pg_ctl: str, data: str) -> None:
    """Last-resort cleanup (garbage collection / interpreter exit): stop fast, kill, delete."""
    try:
        if os.path.exists(pid_file):
            try:
                runner.run([pg_ctl, "stop", "-D", data, "-m", "immediate", "-w", "-t", "10"], timeout=20)
            except Exception:  # noqa: BLE001
                pass
            try:
                pid = int(Path(pid_file).read_text().split()[0])
                # only if that PID still is a postgres (PIDs get reused)
                if b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.killpg(pid, signal.SIGKILL)
            except Exception:  # noqa: BLE001
                pass
    finally:
        shutil.rmtree(root, ignore_errors=True)


class _Runner:
    """Runs server-side commands as the cluster's owner."""

    def __init__(self, user: pwd.struct_passwd | None, method: str | None, cwd: str):
        self.user, self.method, self.cwd = user, method, cwd

    def run(self, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
        kwargs: dict = {}
        env = _clean_env()
        if self.user is not None:  # we are root
            env.update(HOME=self.cwd, USER=self.user.pw_name, LOGNAME=self.user.pw_name)
            if self.method == "runuser":
                cmd = ["runuser", "-u", self.user.pw_name, "--", *cmd]
            elif self.method == "su":
                cmd = ["su", self.user.pw_name, "-s", "/bin/sh", "-c", shlex.join(cmd)]
            else:
                kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        # stdin=DEVNULL: su/runuser must never wait on a terminal. cwd: root's $PWD may be 0700.
        result = subprocess.run(
            cmd, check=False, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=timeout, **kwargs,
        )  # fmt: skip
        return result


# --- the cluster -------------------------------------------------------------------------


class PostgresCluster:
    """A private PostgreSQL server in a temp dir; see the module docstring.

    auth: "trust" (any TCP client on 127.0.0.1 gets in; the password in URLs is ignored) or
    "scram-sha-256" / "md5" (the password is checked). The local socket is always trust, for
    our own psql.
    """

    def __init__(
        self,
        *,
        user: str = "test",
        password: str | None = None,
        auth: str = "scram-sha-256",
        base_dir: str | os.PathLike | None = None,
        port: int | None = None,
        start_timeout: float = 60.0,
        settings: dict[str, str] | None = None,
        switch_user: str | None = None,  # "runuser" | "su" | "setuid"; None: first available
    ):
        reason = pg_available()
        if reason:
            raise PostgresError(reason)
        if auth not in ("trust", "scram-sha-256", "md5"):
            raise ValueError(f"auth must be trust, scram-sha-256 or md5, not {auth!r}")
        self.bindir = find_bindir()
        assert self.bindir is not None
        self.role, self.password = user, password or secrets.token_hex(12)
        self.auth, self.start_timeout = auth, start_timeout
        self.port = port or free_port()
        self._fixed_port = port is not None
        self.settings = {
            "listen_addresses": "'127.0.0.1'",
            "fsync": "off",
            "synchronous_commit": "on",  # off loses the last commits when the server is killed
            "full_page_writes": "off",
            "max_connections": "100",
            "shared_buffers": "32MB",
            "max_wal_size": "256MB",
            "log_min_messages": "warning",
            "log_checkpoints": "off",
            **(settings or {}),
        }
        self.owner = pwd.getpwnam(SERVER_USER) if os.geteuid() == 0 else None
        self.switch_method = (switch_user or _switch_method()) if self.owner else None
        self.superuser = "postgres"
        self.root: Path | None = None
        self._finalizer: weakref.finalize | None = None
        self._base_dir = base_dir
        self.timings: dict[str, float] = {}

    # paths
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    # --- life cycle ----------------------------------------------------------------------

    def __enter__(self) -> PostgresCluster:
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def setup(self) -> PostgresCluster:
        t0 = time.monotonic()
        self._make_root()
        try:
            self._initdb()
            t1 = time.monotonic()
            self.start()
            self.timings["initdb_s"] = t1 - t0
            self.timings["setup_s"] = time.monotonic() - t0
            self._psql(f"CREATE ROLE {_sql_ident(self.role)} LOGIN CREATEDB PASSWORD {_sql_literal(self.password)}")
        except BaseException:
            self.cleanup()
            raise
        return self

    def _make_root(self) -> None:
        candidates = [self._base_dir] if self._base_dir else []
        candidates += [tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"]
        tried = []
        for base in dict.fromkeys(os.fspath(c) for c in candidates):
            if not os.path.isdir(base):
                continue
            # As root we chown the new dir to the server user: every directory above it must be
            # searchable by that user (pytest's /tmp/pytest-of-root is 0700: it is not).
            if self.owner and not _searchable_by(Path(base), self.owner):
                tried.append(f"{base} (not searchable by user {self.owner.pw_name})")
                continue
            # The socket <dir>/.s.PGSQL.NNNNN must fit in sun_path (107 bytes).
            if len(os.path.realpath(base)) > 70:
                tried.append(f"{base} (too long for a unix socket path)")
                continue
            try:
                root = tempfile.mkdtemp(prefix="pgtest-", dir=base)
            except OSError as exc:
                tried.append(f"{base} ({exc.strerror})")
                continue
            if self.owner:
                os.chown(root, self.owner.pw_uid, self.owner.pw_gid)
            os.chmod(root, 0o700)
            self.root = Path(root)
            break
        else:
            raise PostgresError("no temp directory usable by the PostgreSQL server: " + "; ".join(tried))
        self._runner = _Runner(self.owner, self.switch_method, str(self.root))
        self._finalizer = weakref.finalize(
            self, _finalize, str(self.root), str(self.data / "postmaster.pid"), self._runner,
            self._bin("pg_ctl"), str(self.data),
        )  # fmt: skip

    def _initdb(self) -> None:
        cmd = [self._bin("initdb"), "-D", str(self.data), "-U", self.superuser, "-E", "UTF8", "--locale=C",
               "--auth-local=trust", f"--auth-host={self.auth}", "--no-sync"]  # fmt: skip
        if self.auth != "trust":  # the superuser needs a password for host auth to be sane
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self.owner:
                os.chown(pwfile, self.owner.pw_uid, self.owner.pw_gid)
            os.chmod(pwfile, 0o600)
            cmd += [f"--pwfile={pwfile}"]
        result = self._runner.run(cmd, timeout=120)
        if result.returncode != 0:
            raise PostgresError(f"initdb failed ({result.returncode}): {(result.stderr or result.stdout).strip()}")
        if self.auth != "trust":
            (self.root / "pwfile").unlink()
        # Ours, after the defaults: the last setting in postgresql.conf wins.
        self._write_settings()

    def _write_settings(self) -> None:
        conf = dict(self.settings, port=str(self.port), unix_socket_directories=f"'{self.socket_dir}'")
        text = "\n# --- pg_cluster.py ---\n" + "".join(f"{k} = {v}\n" for k, v in conf.items())
        with open(self.data / "postgresql.conf", "a") as fh:  # root can write the postgres-owned file
            fh.write(text)

    def start(self) -> None:
        """Start the server and wait until it accepts connections. Retries on a port race."""
        for attempt in range(5):
            t0 = time.monotonic()
            result = self._runner.run(
                [self._bin("pg_ctl"), "start", "-D", str(self.data), "-l", str(self.log_file), "-w",
                 "-t", str(int(self.start_timeout)), "-s"],
                timeout=self.start_timeout + 30,
            )  # fmt: skip
            if result.returncode == 0 and self._wait_ready():
                self.timings["start_s"] = time.monotonic() - t0
                return
            log = self.log_tail()
            in_use = "Address already in use" in log or "could not bind" in log or "could not create any TCP/IP" in log
            self._stop_quietly()
            if in_use and not self._fixed_port and attempt < 4:
                self.port = free_port()
                self._write_settings()
                continue
            raise PostgresError(
                f"PostgreSQL did not start on 127.0.0.1:{self.port} ({(result.stderr or result.stdout).strip()})"
                f"\n--- {self.log_file} ---\n{log}"
            )

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            r = subprocess.run(
                [self._bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-d", "postgres", "-t", "2"],
                check=False, env=_clean_env(), stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
            )  # fmt: skip
            if r.returncode == 0:
                return True
            if r.returncode == 2 and self.pid is None:  # no response and no server: give up
                return False
            time.sleep(0.05)
        return False

    @property
    def pid(self) -> int | None:
        """The running postmaster's PID, or None."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError, IndexError, TypeError):
            return None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """pg_ctl stop (-m smart|fast|immediate); waits until the server is gone."""
        if not self.running:
            return
        t0 = time.monotonic()
        result = self._runner.run(
            [self._bin("pg_ctl"), "stop", "-D", str(self.data), "-m", mode, "-w", "-t", str(int(timeout)), "-s"],
            timeout=timeout + 30,
        )  # fmt: skip
        if result.returncode != 0 and self.running:
            raise PostgresError(f"pg_ctl stop failed: {(result.stderr or result.stdout).strip()}")
        self.timings["stop_s"] = time.monotonic() - t0

    def _children(self, pid: int) -> list[int]:
        kids = []
        for stat_file in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = Path(stat_file).read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    kids.append(int(stat_file.split("/")[2]))
            except (OSError, ValueError, IndexError):
                pass
        return kids

    def kill(self, backends: bool = True, timeout: float = 10) -> None:
        """SIGKILL the postmaster: the database vanishes as after a crash or OOM kill.

        backends=True (default) also SIGKILLs its children at once, so open client connections
        break immediately ("server closed the connection unexpectedly"); with False they notice
        the postmaster's death on their own a moment later. Waits until all are gone, so
        restart() can reuse the data directory.
        """
        pid = self.pid
        if pid is None:
            return
        kids = self._children(pid)
        if backends and os.getpgid(pid) == pid:  # pg_ctl setsid()s: the group is the server
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
            for k in kids if backends else []:
                try:
                    os.kill(k, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        waiting = [pid, *kids]
        while time.monotonic() < deadline:
            alive = []
            for p in waiting:
                try:
                    os.kill(p, 0)
                    # a zombie is gone for our purposes (init reaps it eventually)
                    if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                        alive.append(p)
                except (ProcessLookupError, FileNotFoundError):
                    pass
            if not alive:
                return
            waiting = alive
            time.sleep(0.05)
        raise PostgresError(f"PostgreSQL processes {waiting} still alive {timeout:.0f}s after SIGKILL")

    def restart(self) -> None:
        """Stop (if running) and start again on the same port with the same data and roles."""
        self._fixed_port = True  # URLs handed out must stay valid
        self.stop()
        self.start()

    def _stop_quietly(self) -> None:
        try:
            self.stop(mode="immediate", timeout=10)
        except Exception:  # noqa: BLE001
            pass
        if self.running:
            try:
                self.kill()
            except Exception:  # noqa: BLE001
                pass

    def cleanup(self) -> None:
        """Stop the server (fast, then immediate, then SIGKILL) and delete the temp dir."""
        if self.root is None:
            return
        t0 = time.monotonic()
        try:
            if self.running:
                try:
                    self.stop(mode="fast", timeout=15)
                except Exception:  # noqa: BLE001
                    self._stop_quietly()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            if self._finalizer is not None:
                self._finalizer.detach()
            self.root = None
            self.timings["cleanup_s"] = time.monotonic() - t0

    # --- SQL and URLs --------------------------------------------------------------------

    def _psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL as the superuser over the private socket; returns stdout."""
        result = subprocess.run(
            [self._bin("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
             "-p", str(self.port), "-U", self.superuser, "-d", dbname, "-c", sql],
            check=False, env=_clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if result.returncode != 0:
            raise PostgresError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def execute(self, sql: str, dbname: str = "postgres") -> str:
        return self._psql(sql, dbname)

    def create_database(self, name: str, driver: str | None = None) -> str:
        """CREATE DATABASE owned by the test role; returns its URL (see url())."""
        self._psql(f"CREATE DATABASE {_sql_ident(name)} OWNER {_sql_ident(self.role)}")
        return self.url(name, driver)

    def drop_database(self, name: str) -> None:
        self._psql(f"DROP DATABASE IF EXISTS {_sql_ident(name)} WITH (FORCE)")

    def url(self, dbname: str = "postgres", driver: str | None = None) -> str:
        """postgresql://role:password@127.0.0.1:port/dbname (driver="psycopg2" -> postgresql+psycopg2)."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{quote(self.role, safe='')}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{quote(dbname, safe='')}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def __repr__(self) -> str:
        return f"<PostgresCluster 127.0.0.1:{self.port} {self.root} {'running' if self.running else 'stopped'}>"


def _searchable_by(path: Path, user: pwd.struct_passwd) -> bool:
    """Can `user` search (x) every directory from / down to `path`?"""
    gids = set(os.getgrouplist(user.pw_name, user.pw_gid))
    p = path.resolve()
    for d in [*reversed(p.parents), p]:
        try:
            st = d.stat()
        except OSError:
            return False
        bit = stat.S_IXUSR if st.st_uid == user.pw_uid else stat.S_IXGRP if st.st_gid in gids else stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True
