"""Issue 25, items 2, 3 and 10: no password reaches a terminal or the tracker, your own data is read
only from data/own/, and an emptied or cut-short params.yaml is refused.

The end-to-end test runs train and evaluate against a real basic-auth MLflow server whose member
password holds '/', '@', ':' and '%', given in MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.errors import UserError
from pipeline.params import load_params
from pipeline.stages import prepare
from pipeline.tracking import connection
from tests.conftest import ROOT, assert_refused, edit_params, make_eval_project, run_cli, run_here, stage_env
from tests.servers import ADMIN, MEMBER, MlflowServer, credentials

# --- item 2: passwords --------------------------------------------------------------------

PASSWORD_CHARS = st.characters(categories=["L", "N"], include_characters="/@:%!#$&*+=?~-_.,;'()[]",
                               exclude_characters="\x00")  # fmt: skip
URL_FORMS = [
    "http://{user}:{password}@127.0.0.1:5000",
    "https://{user}:{password}@mlflow.example.org/",
    "postgresql://{user}:{password}@db.example.org:5432/optuna",
    "postgresql+psycopg://{user}:{password}@127.0.0.1/mlflow?sslmode=require",
    "mysql+pymysql://{user}:{password}@db/optuna",
    "redis://:{password}@cache:6379/0",
]
CONTEXTS = ["{url}", "error: API request to {url}/api/2.0/mlflow/runs/get failed with exception boom",
            "Optuna storage {url} cannot be opened: 'x' ({url}).", "sweep.storage={url}\nnext line"]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    password=st.text(PASSWORD_CHARS, min_size=6, max_size=24),
    user=st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=8),
    form=st.sampled_from(URL_FORMS),
    context=st.sampled_from(CONTEXTS),
    encoded=st.booleans(),
)
def test_no_password_survives_redact_in_any_url_form(password: str, user: str, form: str, context: str,
                                                     encoded: bool) -> None:  # fmt: skip
    secret = quote(password, safe="") if encoded else password  # %40 for '@' and so on, or raw
    text = context.format(url=form.format(user=user, password=secret))
    shown = connection.redact(text)
    outside = context.format(url=form.format(user=user, password=""))  # a password that is a word of it proves nothing
    assume(secret not in outside and secret not in "***")
    assert secret not in shown, shown
    assert form.split("{password}@")[1] in shown  # the host (and what follows) stays readable


def test_redact_keeps_what_is_no_password() -> None:
    for text in ("http://127.0.0.1:5000 denies ann@example.org the experiment", "sqlite:////work/mlflow.db",
                 "postgresql://ann@db/optuna", "see http://127.0.0.1:5000/#/experiments/1/runs?x=1"):  # fmt: skip
        assert connection.redact(text) == text
    assert connection.redact("postgresql://u:pa/ss@host/db") == "postgresql://u:***@host/db"
    assert connection.redact("http://u:p@ss@host:5000/x") == "http://u:***@host:5000/x"


def test_an_http_login_leaves_the_uri_for_mlflows_variables() -> None:
    env = {"MLFLOW_TRACKING_USERNAME": "old", "MLFLOW_TRACKING_PASSWORD": "old"}
    uri = connection.without_login(f"http://ann%40lab:{quote('a/b@c:d%e', safe='')}@127.0.0.1:5000/", env)
    assert uri == "http://127.0.0.1:5000/"
    assert env == {"MLFLOW_TRACKING_USERNAME": "ann@lab", "MLFLOW_TRACKING_PASSWORD": "a/b@c:d%e"}
    assert connection.without_login("postgresql://u:p@h/db", env) == "postgresql://u:p@h/db"  # SQLAlchemy needs it
    # the host part ends at the first '/', as requests reads the login
    assert connection.without_login("http://u:p@s@host:5000/pre/a@b", env) == "http://host:5000/pre/a@b"
    assert env["MLFLOW_TRACKING_PASSWORD"] == "p@s"


@pytest.fixture
def auth_server(tmp_path: Path, tracking_db: Path) -> Iterator[MlflowServer]:
    """A basic-auth `mlflow server` whose SQLite store is a copy of the suite's pre-made empty one."""
    server = MlflowServer(tmp_path / "server", auth=True, store_from=tracking_db)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_train_and_evaluate_show_no_password_given_in_the_tracking_uri(tmp_path: Path,
                                                                        auth_server: MlflowServer) -> None:  # fmt: skip
    pieces = [secrets.token_hex(4) for _ in range(5)]
    password = f"{pieces[0]}/{pieces[1]}@{pieces[2]}:{pieces[3]}%40{pieces[4]}"
    import mlflow.server

    with credentials(ADMIN, auth_server.admin_password):
        mlflow.server.get_app_client("basic-auth", tracking_uri=auth_server.uri).update_user_password(MEMBER, password)
    project = make_eval_project(tmp_path / "p")
    db_password = f"{pieces[0]}/x@y:{pieces[4]}"  # a sweep's storage named in params.yaml reaches the run's params
    edit_params(project, train={"steps": 2, "sample_every": 2, "log_every": 2},
                sweep={"storage": f"postgresql+psycopg://optuna:{db_password}@db.example.org/optuna"})  # fmt: skip
    env = {k: v for k, v in stage_env(project).items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = auth_server.uri.replace("http://", f"http://{MEMBER}:{quote(password, safe='')}@")

    said = ""
    for stage in ("train", "evaluate"):
        result = run_cli([stage], cwd=project, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        said += result.stdout + result.stderr
    assert "View run" in said and auth_server.uri in said  # MLflow's own line, without the login
    with credentials(ADMIN, auth_server.admin_password):
        client = auth_server.client()
        runs = client.search_runs([client.get_experiment_by_name("dcgan-mnist").experiment_id])
    assert len(runs) == 2 and all(run.info.user_id == MEMBER for run in runs)
    logged = " ".join(f"{k} {v}" for run in runs for k, v in {**run.data.params, **run.data.tags}.items())
    assert "sweep.storage" in logged and "optuna:***@db.example.org" in logged
    files = " ".join(p.read_text(errors="replace") for p in project.rglob("*.json"))
    for piece in pieces:
        assert piece not in said, said
        assert piece not in logged and piece not in files


# --- item 3: data.path ----------------------------------------------------------------------


def own_params(project: Path, path: str) -> None:
    own = {"dataset": "own", "path": path, "classes": ["a", "b"]}
    (project / "params.yaml").write_text(yaml.safe_dump({"data": own}))


def own_npz(path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (120, 28, 28), dtype=np.uint8), labels=np.arange(120) % 2)


@pytest.mark.parametrize("path", ["../mine.npz", "/etc/passwd", "{outside}", "data/own/../../mine.npz",
                                  "data/mine.npz", "data/own"])  # fmt: skip
def test_a_data_path_outside_data_own_is_refused_before_anything_is_read(
    tmp_path: Path, path: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "p"
    (project / "data/own").mkdir(parents=True)
    own_npz(tmp_path / "mine.npz")
    path = path.format(outside=tmp_path / "mine.npz")
    own_params(project, path)
    monkeypatch.chdir(project)
    for command in ("check-params", "prepare"):
        error = assert_refused(run_here(capfd, command), f"data.path {path} ", "data/own/")
        assert "allow_pickle" not in error
    assert not (project / "data/prepared").exists()


def test_the_prepare_stage_follows_symlinks_and_reads_only_npz_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "p"
    own = project / "data/own"
    own.mkdir(parents=True)
    own_npz(tmp_path / "mine.npz")
    (own / "out.npz").symlink_to(tmp_path / "mine.npz")
    own_params(project, "data/own/out.npz")
    monkeypatch.chdir(project)
    assert_refused(run_here(capfd, "prepare"), "data.path data/own/out.npz leads out of data/own/", "symlink")

    # The rest: the stage's function, as main() calls it.
    (own / "passwd.npz").write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    np.savez(own / "objects.npz", images=np.array([object()], dtype=object), labels=np.zeros(1))
    for name, says in (("passwd.npz", "is not an .npz file"), ("objects.npz", "holds Python objects")):
        own_params(project, f"data/own/{name}")
        with pytest.raises(UserError, match=rf"^data\.path data/own/{name} {says}") as refused:
            prepare.prepare(load_params(), Path("data/raw/own"), {})
        assert "allow_pickle" not in str(refused.value)

    own_npz(own / "mine.npz")  # a symlink that stays inside the folder is fine
    (own / "link.npz").symlink_to("mine.npz")
    own_params(project, "data/own/link.npz")
    dataset, summary = prepare.prepare(load_params(), Path("data/raw/own"), {})
    assert summary["train"]["count"] + summary["test"]["count"] == 120 and dataset.train_images.shape[1:] == (28, 28)


# --- item 10: an emptied or cut-short params.yaml -------------------------------------------

COMMITTED = (ROOT / "params.yaml").read_text()


def mid_line_cuts(text: str, every: int) -> list[int]:
    """Offsets that cut `text` inside a line (not only its indentation), every `every`-th one."""
    return [at for at in range(1, len(text), every) if not text[:at].rstrip(" \t").endswith("\n")]


def test_params_cut_inside_any_line_are_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    cuts = mid_line_cuts(COMMITTED, 11)
    assert len(cuts) > 300
    cuts.append(COMMITTED.index("steps: 4000") + len("steps: 40"))  # parses: 40 steps instead of 4000
    for at in cuts:
        path.write_text(COMMITTED[:at])
        with pytest.raises(UserError, match=rf"^{path}"):
            load_params(path)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "holds no params (it is empty or only comments)"),
        ("# yaml-language-server: $schema=params.schema.json\n# every knob\n\n", "holds no params"),
        (COMMITTED[: COMMITTED.index("steps: 4000") + len("steps: 40")], "ends inside line"),
        (COMMITTED[: len(COMMITTED) // 2].rstrip(), "ends inside line"),
    ],
    ids=["empty", "comments only", "cut inside train.steps", "cut halfway"],
)
def test_check_params_and_train_refuse_an_emptied_or_cut_params_file(
    tmp_path: Path, text: str, says: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "params.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    for command in ("check-params", "train"):
        assert_refused(run_here(capfd, command), "params.yaml", says)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
