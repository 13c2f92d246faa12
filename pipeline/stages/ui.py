"""Command `ui`: the MLflow UI, opened on the runs table as this pipeline's runs are compared.

`python -m pipeline ui` starts `mlflow ui` on the project's store (mlflow.db; with a team
server it starts nothing) and prints the address of the experiment's runs table sorted by FID,
with the FID, the N it was measured at, its 95 % interval, KID, precision, recall and the params that set a run
apart as columns: no clicks on "Columns". The view is MLflow's own shared view state (an
experiment tag read by the UI's `viewStateShareKey`), so the address can be passed to
a colleague. Scores at different N are not comparable: N sits beside every FID (training
runs scored by `evaluate`, sweep trials at `sweep.eval_samples`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.parse
import webbrowser
from pathlib import Path

from pipeline.errors import UserError
from pipeline.params import Params, load_params

VIEW = "pipeline-runs-by-fid"  # the share key: the experiment tag mlflow.sharedViewState.<VIEW>
METRICS = (
    "eval_fid",
    "eval_fid_low",  # the FID's 95 % interval: two runs whose intervals overlap are not told apart
    "eval_fid_high",
    "eval_kid_mean",
    "eval_precision",
    "eval_recall",
    "eval_classes_covered",
)
TAGS = ("eval.n_samples",)
PARAMS = (
    "train.steps",
    "train.batch_size",
    "train.lr_g",
    "train.lr_d",
    "train.beta1",
    "train.loss",
    "train.ema_decay",
    "model.arch",
    "model.conditional",
    "train.seed",
    "data.dataset",
)


def column(kind: str, name: str) -> str:
    """A runs-table column id as MLflow's UI writes it: metrics.`eval_fid`."""
    return f"{kind}.`{name}`"


def view_state() -> dict[str, object]:
    """The runs table: sorted by FID (lowest first), N and the interval beside it, then the other scores and key params."""
    columns = [column("metrics", METRICS[0]), *(column("tags", t) for t in TAGS)]
    columns += [column("metrics", m) for m in METRICS[1:]] + [column("params", p) for p in PARAMS]
    return {
        "orderByKey": column("metrics", METRICS[0]),
        "orderByAsc": True,
        "selectedColumns": columns,
        "columnOrder": columns,
    }


def runs_table_address(base: str, experiment_id: str) -> str:
    # Only the share key: MLflow's UI ignores a shared view when the address carries its own sort or filter.
    query = urllib.parse.urlencode({"viewStateShareKey": VIEW, "workflowType": "machine_learning"})
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def publish_view(params: Params) -> tuple[str, str]:
    """Store the view on the experiment; (tracking URI as shown, experiment id)."""
    from mlflow import MlflowClient

    from pipeline.tracking import connection

    uri, experiment_id, _ = connection.open_experiment(
        params.tracking.experiment, Path.cwd(), dict(os.environ)
    )
    try:
        MlflowClient().set_experiment_tag(
            experiment_id, f"mlflow.sharedViewState.{VIEW}", json.dumps(view_state())
        )
    except Exception as exc:  # noqa: BLE001 - a store that refuses the write: one sentence
        raise UserError(f"cannot store the runs view in {uri} ({connection.first_line(exc)}).") from None
    return uri, experiment_id


def main(params_path: Path = Path("params.yaml"), port: int = 5000, open_browser: bool = False) -> None:
    params = load_params(params_path)
    uri, experiment_id = publish_view(params)
    if uri.startswith(("http://", "https://")):  # the team server: its UI is already up
        address = runs_table_address(uri, experiment_id)
        print(f"the runs, sorted by FID: {address}")
        if open_browser:
            webbrowser.open(address)
        return
    address = runs_table_address(f"http://127.0.0.1:{port}", experiment_id)
    print(f"MLflow UI on {uri}; the runs, sorted by FID: {address} (Ctrl-C stops)", flush=True)
    from pipeline.tracking import connection

    env = dict(os.environ)
    store = connection.tracking_uri(connection.project_root(Path.cwd(), env), env)  # with its login, if any
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        store,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    # MLflow 3 otherwise starts a job runner and its worker processes beside the UI, which viewing runs never needs
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    serve(command, address if open_browser else None, env)


def serve(command: list[str], address: str | None, env: dict[str, str] | None = None) -> None:
    """Run the MLflow UI until it ends (opening `address` in a browser, if given). Ctrl-C, SIGTERM and
    SIGHUP stop its whole process group, the server and whatever workers it started, so that it never
    outlives this command; the command then ends as a stopped stage does (exit 128 + the signal)."""
    import signal
    import time

    from pipeline import signals

    with subprocess.Popen(command, start_new_session=True, env=env) as server:
        with signals.stop_on_signals(signals.StopRequest(), second_stops_at_once=False) as request:
            if address:
                webbrowser.open(address)
            while server.poll() is None and not request.signum:
                time.sleep(0.2)
        if request.signum:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            server.wait()
            raise signals.Stopped(
                request.signum, f"the MLflow UI stopped on {signal.Signals(request.signum).name}."
            )
