"""`python -m pipeline sweep`: spec errors, the budget and report core, and real studies in subprocesses."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from pipeline import cli, optuna_study
from pipeline.data import save_prepared
from pipeline.params import Params, load_params
from tests.conftest import ROOT, SMALL_MODEL, run_cli, synthetic_mnist, write_reference

TINY_SWEEP = {"trials": 3, "steps": 12, "fid_every": 6, "fid_samples": 256, "eval_samples": 256, "heartbeat_s": 1,
              "prune_after_trials": 1, "prune_after_steps": 0, "startup_trials": 2}  # fmt: skip


def write_params(path: Path, sweep_section: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Path:
    raw = {"model": SMALL_MODEL, "train": {"batch_size": 8, "log_every": 3, "device": "cpu"},
           "evaluate": {"batch_size": 256, "fid_resamples": 10, "kid_subsets": 3, "kid_subset_size": 64},
           "sweep": {**TINY_SWEEP, **(sweep_section or {})}, **sections}  # fmt: skip
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --- bad specs: one sentence, exit 2, before anything runs -----------------------------------


@pytest.mark.parametrize(
    ("space", "pattern"),
    [
        ({"train.lr": {"low": 1e-4, "high": 1e-3}}, r"sweep\.space\.train\.lr is not a searchable param \(searchable: .*train\.lr_g"),
        ({"train.lr_g": {"low": 1e-3, "high": 1e-4}}, r"sweep\.space\.train\.lr_g is an empty range: low 0\.001 must be below high 0\.0001"),
        ({"train.lr_g": {"low": 0, "high": 1e-3, "log": True}}, r"on a log scale, so low must be above 0, not 0"),
        ({"train.lr_g": {"low": 1e-4, "high": 2}}, r"2\.0 is not a valid train\.lr_g \(input should be less than or equal to 1\)"),
        ({"train.batch_size": {"low": 8, "high": 32.5}}, r"train\.batch_size is an integer, so low, high and step must be whole"),
        ({"train.steps": {"low": 10, "high": 20}}, r"sweep\.space\.train\.steps cannot be searched: every trial takes it from sweep\.steps"),
        ({"train.precision": {"choices": ["fp32", "fp16"]}}, r'"fp16" is not a valid train\.precision'),
        ({"train.lr_g": {"lo": 1e-4, "high": 1e-3}}, r"unknown key 'sweep\.space\.train\.lr_g\.lo' \(allowed here: low, high, log, step, choices\)"),
        ({}, r"sweep\.space is empty"),
    ],
)
def test_bad_search_space_is_one_sentence_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], space: dict[str, Any], pattern: str
) -> None:
    params = write_params(tmp_path / "params.yaml", {"space": space})
    assert cli.main(["sweep", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {params}: ") and err.count("\n") == 1 and err.rstrip().endswith(".")
    assert re.search(pattern, err), err
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("args", "sweep_section", "pattern"),
    [
        ([], {"trials": -2}, r"'sweep\.trials' = -2 is invalid: input should be greater than 0\."),
        ([], {"steps": 0}, r"'sweep\.steps' = 0 is invalid: input should be greater than 0\."),
        ([], {"fid_samples": 100}, r"sweep\.fid_samples must be at least 256"),
        (["--trials", "-1"], {}, r"with --trials: 'sweep\.trials' = -1 is invalid: input should be greater than 0\."),
    ],
)
def test_bad_budget_is_one_sentence_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], sweep_section: dict[str, Any], pattern: str
) -> None:
    params = write_params(tmp_path / "params.yaml", sweep_section)
    assert cli.main(["sweep", "--params", str(params), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(pattern, err), err


def test_committed_sweep_section_is_valid_and_searches_real_params() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.sweep == Params().sweep and set(params.sweep.space) == {"train.lr_g", "train.lr_d", "train.beta1"}


# --- the core: a trial's params, the budget, the report ----------------------------------------


def test_trial_params_take_the_budget_and_the_sampled_values() -> None:
    params = Params.model_validate({"sweep": {"steps": 300, "fid_every": 100, "fid_samples": 500, "eval_samples": 2000}})
    p = optuna_study.trial_params(params, {"train.lr_g": 0.0005, "train.batch_size": 64})
    assert (p.train.steps, p.train.fid_every, p.train.fid_samples, p.evaluate.n_samples) == (300, 100, 500, 2000)
    assert (p.train.lr_g, p.train.batch_size, p.train.lr_d) == (0.0005, 64, params.train.lr_d)


def test_suggest_gives_integers_for_integer_params() -> None:
    space = {"train.batch_size": {"low": 16, "high": 64, "step": 16}, "train.lr_g": {"low": 1e-4, "high": 1e-3, "log": True},
             "train.fast_upsample": {"choices": [True, False]}}  # fmt: skip
    params = Params.model_validate({"sweep": {"space": space}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        values = optuna_study.suggest(study.ask(), params)
        assert type(values["train.batch_size"]) is int and values["train.batch_size"] in (16, 32, 48, 64)
        assert 1e-4 <= values["train.lr_g"] <= 1e-3 and type(values["train.fast_upsample"]) is bool
        optuna_study.trial_params(params, values)  # every sampled point is valid params


def _trial(number: int, state: TrialState, value: float | None = None, user: dict[str, Any] | None = None,
           system: dict[str, Any] | None = None) -> optuna.trial.FrozenTrial:  # fmt: skip
    trial = create_trial(
        state=state, value=value, params={"train.lr_g": 1e-4 * (number + 1)},
        distributions={"train.lr_g": FloatDistribution(1e-5, 1e-2, log=True)},
        intermediate_values={6: 900.0 + number}, user_attrs=user or {}, system_attrs=system or {},
    )  # fmt: skip
    trial.number = number
    return trial


def test_budget_skips_retried_and_given_back_trials() -> None:
    trials = [
        _trial(0, TrialState.COMPLETE, 10.0),
        _trial(1, TrialState.FAIL),  # its process died: run again as trial 3
        _trial(2, TrialState.FAIL, user={optuna_study.OVER_BUDGET: True}),
        _trial(3, TrialState.WAITING, system={"failed_trial": 1, "retry_history": [1]}),
        _trial(4, TrialState.FAIL),  # diverged: a result, it counts
    ]
    assert optuna_study.budget_used(trials) == 3
    assert optuna_study.budget_used(trials, up_to=3) == 2


def test_table_ranks_finished_then_pruned_and_command_reproduces_the_best() -> None:
    trials = [_trial(0, TrialState.PRUNED), _trial(1, TrialState.COMPLETE, 55.5), _trial(2, TrialState.COMPLETE, 42.25),
              _trial(3, TrialState.FAIL, user={optuna_study.OVER_BUDGET: True})]  # fmt: skip
    lines = optuna_study.table(trials, ["train.lr_g"]).splitlines()
    assert lines[0].split() == ["rank", "trial", "state", "FID", "seconds", "train.lr_g"]
    assert [line.split()[1:3] for line in lines[1:]] == [["2", "COMPLETE"], ["1", "COMPLETE"], ["0", "PRUNED"]]
    assert "42.25" in lines[1] and "(900.0 @6)" in lines[3]
    params = Params.model_validate({"sweep": {"steps": 300}})
    assert optuna_study.dvc_command(trials[2], params) == "dvc exp run -S train.steps=300 -S train.lr_g=0.00030000000000000003"


# --- real studies, in subprocesses as users run them ------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The committed frozen classifier, a reference it computes here, synthetic data, tiny params."""
    (tmp_path / "models").mkdir()
    shutil.copy2(ROOT / "models/classifier-mnist.pt", tmp_path / "models/classifier-mnist.pt")
    mnist = synthetic_mnist(n_train=128, n_test=512)  # the reference needs N >= 2 x 128 features
    save_prepared(mnist, tmp_path / "data/prepared/mnist.npz")
    write_reference(tmp_path, mnist)
    write_params(tmp_path / "params.yaml")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DCGAN_SWEEP")}
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores: no thread oversubscription
    env["PYTHONPATH"] = str(ROOT)
    return tmp_path, env


def start(project: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "sweep"], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def load(project: Path) -> optuna.Study:
    # skip_table_creation: a reader must not race the sweep to create the tables of a fresh database
    storage = optuna.storages.RDBStorage(f"sqlite:///{project / 'optuna.db'}", skip_table_creation=True)
    return optuna.load_study(study_name="dcgan-sweep", storage=storage)


def mlflow_runs(project: Path) -> list[Any]:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("dcgan-mnist")
    return client.search_runs([experiment.experiment_id], "tags.sweep = 'dcgan-sweep'")


def counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


@pytest.mark.slow
def test_two_processes_share_one_study_without_repeating_a_trial(project: tuple[Path, dict[str, str]]) -> None:
    path, env = project
    procs = [start(path, env), start(path, env)]  # one creates the study, the other joins it
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(outputs)

    study = load(path)
    done = counted(study)
    assert len(done) == 3 and len({tuple(sorted(t.params.items())) for t in done}) == 3
    assert {t.number for t in done} == {0, 1, 2}
    runs = mlflow_runs(path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == "dcgan-sweep" and parents[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == ["dcgan-sweep #0", "dcgan-sweep #1", "dcgan-sweep #2"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    for run in children:
        trial = study.trials[int(run.data.tags["sweep.trial"])]
        assert run.data.tags["sweep.state"] == trial.state.name
        assert run.data.params["train.steps"] == "12" and run.data.params["evaluate.n_samples"] == "256"
        assert float(run.data.params["train.lr_g"]) == trial.params["train.lr_g"]
        assert "fid_quick" in run.data.metrics and "g_loss" in run.data.metrics
        if trial.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED" and run.data.metrics["eval_fid"] == pytest.approx(trial.value)
        else:
            assert run.info.status == "KILLED"
    from mlflow import MlflowClient

    artifacts = {a.path for a in MlflowClient().list_artifacts(parents[0].info.run_id, "sweep")}
    assert {"sweep/trials.txt", "sweep/optimization_history.png", "sweep/best.txt"} <= artifacts

    best = (path / "sweeps/dcgan-sweep/best.txt").read_text()
    assert best.startswith("dvc exp run -S train.steps=12 -S train.lr_g=") and "-S train.beta1=" in best
    for out in outputs:  # each process ends with the ranked table of the whole study
        assert re.search(r"rank\s+trial\s+state\s+FID\s+seconds", out) and "dvc exp run -S" in out


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_trials(project: tuple[Path, dict[str, str]]) -> None:
    path, env = project
    proc = start(path, env)
    deadline = time.time() + 300
    first: optuna.trial.FrozenTrial | None = None
    while time.time() < deadline and proc.poll() is None:  # kill it once its second trial is in MLflow
        if (path / "optuna.db").exists():
            try:
                trials = load(path).get_trials()
            except Exception:  # noqa: BLE001 - the study or its tables are being created
                trials = []
            if len(trials) >= 2 and trials[0].state.is_finished() and optuna_study.RUN_ID in trials[1].user_attrs:
                first = trials[0]
                break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert first is not None, "the sweep ended before it could be killed"

    result = run_cli(["sweep"], cwd=path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    study = load(path)
    trials = study.get_trials()
    assert trials[0].state == first.state and trials[0].value == first.value  # not redone
    assert trials[0].datetime_complete == first.datetime_complete
    assert trials[1].state == TrialState.FAIL  # the killed one, run again with the same params
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retried) == 1 and retried[0].params == trials[1].params and retried[0].state.is_finished()
    assert len(counted(study)) == 3 and optuna_study.budget_used(trials) == 3
    runs = {r.data.tags["sweep.trial"]: r for r in mlflow_runs(path) if "sweep.trial" in r.data.tags}
    assert runs["1"].info.status == "KILLED" and runs["1"].data.tags["sweep.state"] == "STALE"
    assert len([r for r in mlflow_runs(path) if r.data.tags.get("sweep.trial") == "0"]) == 1
    assert "(joined)" in result.stdout and re.search(r"1\s+FAIL \(rerun #\d\)", result.stdout), result.stdout


def test_a_sqlite_study_outside_the_project_needs_consent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = tmp_path / "p"
    project.mkdir()
    params = write_params(project / "params.yaml")
    outside = tmp_path / "elsewhere" / "optuna.db"
    for args in (["--storage", f"sqlite:///{outside}"], []):
        if not args:  # the same through params.yaml
            write_params(params, {"storage": f"sqlite:///{outside}"})
        assert cli.main(["sweep", "--params", str(params), *args]) == 2
        err = capsys.readouterr().err
        assert f"Optuna storage {outside} is outside the project" in err and "--allow-outside" in err
    assert not outside.parent.exists() and not (project / "mlflow.db").exists()
    optuna_study.check_storage_location(f"sqlite:///{outside}", project, allow_outside=True)  # consent given
    optuna_study.check_storage_location("postgresql://ann:pw@db/optuna", project, allow_outside=False)  # not a file


def test_a_trial_whose_process_died_before_its_first_heartbeat_is_found() -> None:
    """Optuna never calls a trial without heartbeats stale: without this, every worker waits for it forever."""
    import datetime

    now = datetime.datetime(2026, 12, 3, 12, 0, 0)
    trials = []
    for number, (state, user, age_s) in enumerate([
        (TrialState.RUNNING, {}, 120),  # created, then the storage went away: an orphan
        (TrialState.RUNNING, {optuna_study.STARTED_BY: "host:1"}, 120),  # its objective began: heartbeats decide
        (TrialState.RUNNING, {}, 5),  # just created: its objective is about to begin
        (TrialState.COMPLETE, {}, 120),
    ]):  # fmt: skip
        trial = _trial(number, state, 1.0 if state == TrialState.COMPLETE else None, user=user)
        trial.datetime_start = now - datetime.timedelta(seconds=age_s)
        trials.append(trial)
    assert [t.number for t in optuna_study.orphans(trials, now, grace_s=60)] == [0]


def test_a_failed_trial_whose_retry_is_being_queued_is_waited_for() -> None:
    """Optuna fails a stale trial, then queues its retry: a process that looks in between must not see a finished
    study (the team test once saw a worker report a table without the retry). Failed from outside and recent: due; a result, given
    back, retried already, out of retries or long ago: not."""
    import datetime

    now = datetime.datetime(2026, 12, 7, 22, 0, 0)
    trials = [
        _trial(0, TrialState.FAIL),  # stale a moment ago: its retry is on the way
        _trial(1, TrialState.FAIL, user={optuna_study.RESULT: True}),  # diverged
        _trial(2, TrialState.FAIL, user={optuna_study.OVER_BUDGET: True}),
        _trial(3, TrialState.FAIL),  # retried as trial 4 already
        _trial(4, TrialState.WAITING, system={"failed_trial": 3, "retry_history": [3]}),
        _trial(5, TrialState.FAIL, system={"failed_trial": 8, "retry_history": [8, 9, 10]}),  # its retries are spent
        _trial(6, TrialState.FAIL),  # long ago: whoever was queueing it died
        _trial(7, TrialState.COMPLETE, 1.0),
    ]
    for trial in trials:
        trial.datetime_complete = now - datetime.timedelta(seconds=120 if trial.number == 6 else 1)
    assert [t.number for t in optuna_study.retries_due(trials, now, grace_s=60)] == [0]


def test_work_waits_for_the_retry_of_a_trial_failed_elsewhere(tmp_path: Path) -> None:
    """The race itself, on a real storage: trial 1 has just been failed by another process, which queues its
    retry half a second later; `work` with the budget spent runs that retry instead of returning at once."""
    import threading

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="race")
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=1.0, params={"x": 0.5},
                                 distributions={"x": FloatDistribution(0, 1)}))  # fmt: skip
    stale = study.ask({"x": FloatDistribution(0, 1)})
    storage.set_trial_state_values(stale._trial_id, state=TrialState.FAIL)  # what fail_stale_trials does first
    queue = threading.Timer(0.5, optuna_study.retry, (study, storage.get_trial(stale._trial_id)))
    ran: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        return trial.suggest_float("x", 0, 1)

    queue.start()
    try:
        optuna_study.work(study, objective, budget=2, poll_s=0.1, catch=())
    finally:
        queue.join()
    assert ran == [2] and study.trials[2].system_attrs["failed_trial"] == 1
    assert optuna_study.budget_used(study.trials) == 2
