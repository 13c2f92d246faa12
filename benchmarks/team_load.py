"""Load on the team's servers: sweep workers against one PostgreSQL-backed MLflow server and Optuna study.

Starts a throw-away PostgreSQL cluster and an `mlflow server` on it with basic auth (both on
127.0.0.1, removed afterwards), then runs `--workers` sweep processes, each in a clone of its
own (a small model and classifier, short trial budgets), sharing only the storage URL and the
tracking URI. Twice: undisturbed, and with one worker SIGKILLed in the middle of a trial.
Reports trials per minute, the requests the server answered with a 5xx status (must be 0), and
what the workers' logs say MLflow did not receive.

    python benchmarks/team_load.py                    # 4 workers x 3 trials, 30 steps each
    python benchmarks/team_load.py --quick            # 2 workers x 1 trial, to prove it runs
    python benchmarks/team_load.py --stages           # one member's train, evaluate, resend: seconds
                                                      # without and with the server's login cache

Needs PostgreSQL's server binaries (Debian: apt-get install postgresql) and the dev extra.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import edit_params, make_eval_project  # noqa: E402
from tests.postgres import PostgresCluster, pg_available  # noqa: E402
from tests.servers import MlflowServer  # noqa: E402


def clone(path: Path, trials: int, steps: int) -> Path:
    """A worker's project: tiny model and classifier, a sweep of `trials` trials of `steps` steps."""
    make_eval_project(path)
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["sweep"] = {"trials": trials, "steps": steps, "fid_every": steps // 2, "fid_samples": 32, "eval_samples": 64,
                       "heartbeat_s": 2, "prune_after_trials": 1000, "startup_trials": 2}  # fmt: skip
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    return path


def run_workers(where: Path, server: MlflowServer, storage: str, workers: int, trials: int, steps: int,
                kill_one: bool) -> dict[str, Any]:  # fmt: skip
    clones = [clone(where / f"clone{i}", trials, steps) for i in range(workers)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs = [where / f"worker{i}.log" for i in range(workers)]
    started = time.monotonic()
    procs = []
    for project, log in zip(clones, logs, strict=True):
        with open(log, "wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "pipeline", "sweep", "--storage", storage],
                                          cwd=project, env=server.member_env(env), stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    killed = None
    if kill_one:
        while procs[0].poll() is None:  # SIGKILL worker 0 mid-trial: after a quick FID, before the final score
            if re.search(r"^trial \d+: step ", logs[0].read_text(), re.MULTILINE):
                os.killpg(procs[0].pid, signal.SIGKILL)
                killed = 0
                break
            time.sleep(0.05)
    codes = [proc.wait() for proc in procs]
    seconds = time.monotonic() - started
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name="dcgan-sweep", storage=storage)
    states = [t.state for t in study.get_trials()]
    finished = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    lost = [line for log in logs for line in log.read_text().splitlines() if "MLflow did not receive" in line]
    errors = [log.read_text().strip().splitlines()[-1] for log, code in zip(logs, codes, strict=True)
              if code not in (0, -signal.SIGKILL) and log.read_text().strip()]  # fmt: skip
    return {
        "workers": workers, "killed_worker": killed, "exit_codes": codes, "seconds": round(seconds, 1),
        "finished_trials": finished, "failed_trials": sum(s == TrialState.FAIL for s in states),
        "trials_per_minute": round(60 * finished / seconds, 2), "server_5xx": len(server.failed_requests()),
        "lost_logging": lost, "worker_errors": errors,
    }  # fmt: skip


def time_stages(where: Path, pg: PostgresCluster, steps: int) -> dict[str, Any]:
    """Seconds of train, evaluate and resend in one clone against a basic-auth server that checks the
    password on every request (MLflow's default), then against one that keeps a checked login."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = {}
    for cache_s in (0, 300):
        server = MlflowServer(where / f"server{cache_s}", pg.create_database(f"mlflow_cache{cache_s}"), auth=True,
                              auth_cache_s=cache_s)  # fmt: skip
        server.start()
        try:
            project = make_eval_project(where / f"member{cache_s}")
            edit_params(project, train={"steps": steps, "fid_every": steps // 2, "fid_samples": 32})
            for stage in ("train", "evaluate", "resend"):
                started = time.monotonic()
                subprocess.run([sys.executable, "-m", "pipeline", stage], cwd=project, env=server.member_env(env),
                               check=True, capture_output=True)  # fmt: skip
                rows.setdefault(stage, {})[f"cache {cache_s} s"] = round(time.monotonic() - started, 1)
        finally:
            server.stop()
    for stage, row in rows.items():
        print(f"{stage:<9}" + "".join(f"{k}: {v:>6.1f} s   " for k, v in row.items())
              + f"x{row['cache 0 s'] / row['cache 300 s']:.2f}")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--trials", type=int, default=3, help="trials per worker (the study's budget: workers x this)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per trial")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--stages", action="store_true", help="time one member's stages without/with the login cache")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/team_load.json")
    args = parser.parse_args()
    if args.quick:
        args.workers, args.trials, args.steps = 2, 1, 6
    if (reason := pg_available()) is not None:
        raise SystemExit(f"error: {reason}.")
    rows = []
    with tempfile.TemporaryDirectory(prefix="team-load-") as tmp, PostgresCluster() as pg:
        if args.stages:
            print(json.dumps(time_stages(Path(tmp), pg, args.steps)))
            return
        for kill_one in (False, True):
            where = Path(tmp) / ("killed" if kill_one else "undisturbed")
            server = MlflowServer(where / "server", pg.create_database(f"mlflow_{int(kill_one)}"), auth=True, workers=2)
            server.start()
            try:
                storage = pg.create_database(f"optuna_{int(kill_one)}")
                row = run_workers(where, server, storage, args.workers, args.workers * args.trials, args.steps,
                                  kill_one)  # fmt: skip
            finally:
                server.stop()
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'run':<12}{'trials':>7}{'seconds':>9}{'trials/min':>12}{'server 5xx':>12}{'lost logging':>14}")
    for row in rows:
        name = "1 killed" if row["killed_worker"] is not None else "undisturbed"
        print(f"{name:<12}{row['finished_trials']:>7}{row['seconds']:>9.0f}{row['trials_per_minute']:>12.2f}"
              f"{row['server_5xx']:>12}{len(row['lost_logging']):>14}")  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"config": vars(args) | {"output": str(args.output)}, "rows": rows}, indent=2))
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
