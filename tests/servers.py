"""Real `mlflow server` processes on 127.0.0.1 for the tests and the load benchmark.

Plain (a SQLite store, as a single user runs it) or the team's deployment: a PostgreSQL store,
MLflow's basic-auth app with an admin and one member, and artifacts proxied to a folder.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ADMIN = "admin"
MEMBER = "trainer"


class ServerError(RuntimeError):
    """The server did not start; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MlflowServer:
    """`mlflow server` on a free 127.0.0.1 port, its store and artifacts under `root`.

    backend_uri: the store (default: SQLite in `root`); auth: the basic-auth app, with an admin
    and a member whose passwords this object holds; auth_cache_s: how long it keeps a checked login
    (0: a scrypt check on every request, MLflow's default; 300 as docs/team.md advises).
    """

    def __init__(self, root: Path, backend_uri: str | None = None, auth: bool = False, workers: int = 1,
                 auth_cache_s: int = 300, store_from: Path | None = None) -> None:  # fmt: skip
        """`store_from`: a SQLite store to start from (copied to root/store.db, the default store), such as
        the suite's pre-made empty one, for tests about a server rather than about it creating a store."""
        self.root, self.auth, self.workers, self.auth_cache_s = root, auth, workers, auth_cache_s
        self.backend_uri = backend_uri or f"sqlite:///{root / 'store.db'}"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.admin_password, self.member_password = secrets.token_hex(8), secrets.token_hex(8)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        root.mkdir(parents=True, exist_ok=True)
        if store_from is not None:
            assert backend_uri is None, "store_from fills the default store"
            shutil.copyfile(store_from, root / "store.db")

    @property
    def log(self) -> Path:
        return self.root / f"server-{self.starts}.log"

    def start(self, timeout: float = 240) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers
        command = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", self.backend_uri, "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
        ]  # fmt: skip
        if self.auth:
            ini = self.root / "basic_auth.ini"
            ini.write_text(
                "[mlflow]\ndefault_permission = READ\n"
                f"database_uri = sqlite:///{self.root / 'basic_auth.db'}\n"
                f"admin_username = {ADMIN}\nadmin_password = {self.admin_password}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                f"auth_cache_ttl_seconds = {self.auth_cache_s}\n"
            )
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
            command[2:2] = ["--app-name", "basic-auth"]
        self.starts += 1
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                         start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        else:
            self.stop()
            raise ServerError(f"mlflow server did not answer /health within {timeout} s: {self.log.read_text()[-2000:]}")
        if self.auth and self.starts == 1:
            import mlflow.server

            with credentials(ADMIN, self.admin_password):
                mlflow.server.get_app_client("basic-auth", tracking_uri=self.uri).create_user(
                    username=MEMBER, password=self.member_password
                )

    def member_env(self, env: dict[str, str], password: str | None = None) -> dict[str, str]:
        """`env` as a team member's: the tracking URI and (with auth) the member's login."""
        env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_TRACKING_URI"] = self.uri
        if self.auth:
            env.update(MLFLOW_TRACKING_USERNAME=MEMBER, MLFLOW_TRACKING_PASSWORD=password or self.member_password)
        return env

    def client(self) -> Any:
        """A client that sees everything (the admin's, with auth; it sets the login in os.environ)."""
        from mlflow import MlflowClient

        if self.auth:
            os.environ.update(MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=self.admin_password)
        return MlflowClient(tracking_uri=self.uri)

    def failed_requests(self) -> list[str]:
        """Access-log lines of the requests the server answered with a 5xx status, over all its starts."""
        lines = []
        for log in sorted(self.root.glob("server-*.log")):
            lines += [line for line in log.read_text(errors="replace").splitlines() if re.search(r'" 5\d\d\b', line)]
        return lines

    def kill(self) -> None:
        """The fault: SIGKILL to the server and its workers, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()


class credentials:  # noqa: N801 - used as a context manager, like a function
    """MLFLOW_TRACKING_USERNAME/PASSWORD set in os.environ for the with-block, as before afterwards."""

    def __init__(self, user: str, password: str) -> None:
        self.values = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}

    def __enter__(self) -> None:
        self.before = {key: os.environ.get(key) for key in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc: object) -> None:
        for key, value in self.before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
