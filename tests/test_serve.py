"""`python -m pipeline serve`: a real server process answers real HTTP requests with the champion's digits."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import run_cli, stage_env, start
from tests.servers import free_port

CHAMPION = "models:/dcgan-mnist-generator@champion"


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - a server this test started on 127.0.0.1
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers["Content-Type"]


def wait_until_up(base: str, process: Any, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve exited {process.returncode}: {log.with_suffix('.err').read_text()[-2000:]}")
        try:
            status, body, _ = get(f"{base}/health")
            if status == 200:
                return json.loads(body)
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail("serve did not answer within 120 s")


@pytest.mark.slow
def test_the_served_champion_draws_what_generate_draws(finished_project: Path, tmp_path: Path) -> None:
    project, port = finished_project, free_port()
    process = start(["serve", "--port", str(port)], cwd=project, env=stage_env(project), log=tmp_path / "serve")
    base = f"http://127.0.0.1:{port}"
    try:
        health = wait_until_up(base, process, tmp_path / "serve")
        assert health["model"] == CHAMPION and health["conditional"] is False and len(health["classes"]) == 10

        status, body, kind = get(f"{base}/digits?n=6&seed=11")
        assert status == 200 and kind == "application/json"
        served = json.loads(body)
        assert (served["n"], served["seed"], served["shape"]) == (6, 11, [6, 28, 28])
        images = np.array(served["images"], dtype=np.int64)
        assert images.shape == (6, 28, 28) and images.min() >= 0 and images.max() <= 255

        drawn = run_cli(["generate", "--model", CHAMPION, "-n", "6", "--seed", "11", "--output", "serve-test.npy"],
                        cwd=project, env=stage_env(project))  # fmt: skip
        assert drawn.returncode == 0, drawn.stderr
        assert np.array_equal(np.load(project / "serve-test.npy"), images.astype(np.uint8))

        status, body, kind = get(f"{base}/digits?n=4&format=png")
        assert status == 200 and kind == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"

        for query, says in (("n=0", "n must be between 1 and 1000, not 0"), ("n=two", "n must be a whole number"),
                            ("label=7", "is not a conditional generator"), ("colour=red", "unknown query parameter")):  # fmt: skip
            status, body, _ = get(f"{base}/digits?{query}")
            assert status == 400 and says in json.loads(body)["error"], body
        assert get(f"{base}/elsewhere")[0] == 404
        assert process.poll() is None  # bad requests never stop the server
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serving_a_missing_registered_model_is_one_sentence(tmp_path: Path, tracking_db: Path) -> None:
    from tests.conftest import make_project, with_db

    project = with_db(make_project(tmp_path / "p"), tracking_db)
    result = run_cli(["serve", "--model", "models:/nobody@champion", "--port", "0"], cwd=project, env=stage_env(project))
    assert result.returncode == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
