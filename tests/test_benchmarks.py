"""The benchmarks run end to end in their short modes (figures are not asserted: no timing tests)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline import data, runtime, scoring
from tests.conftest import ROOT, synthetic_mnist


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def bench_project(tmp_path: Path) -> Path:
    """A project folder as a fresh clone has it: params, the committed classifier, synthetic prepared data."""
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "models").mkdir()
    shutil.copy2(ROOT / "models/classifier-mnist.pt", tmp_path / "models/classifier-mnist.pt")
    data.save_prepared(synthetic_mnist(n_train=512, n_test=300), tmp_path / "data/prepared/mnist.npz")
    return tmp_path


def quick_throughput(project: Path, device: str) -> tuple[dict[str, Any], str]:
    """`train_throughput.py --quick` on one device: its JSON report and its terminal output."""
    out = project / "bench.json"
    script = str(ROOT / "benchmarks/train_throughput.py")
    result = run_script([script, "--quick", "--devices", device, "--output", str(out)], project)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


@pytest.mark.slow
def test_train_throughput_quick_mode_reports_every_figure(bench_project: Path) -> None:
    report, stdout = quick_throughput(bench_project, "cpu")
    (row,) = report["training"]
    assert row["device"] == "cpu" and row["batch_size"] == 32
    assert row["baseline_img_s"] > 0 and row["pipeline_img_s"] > 0
    assert row["speedup"] == pytest.approx(row["pipeline_img_s"] / row["baseline_img_s"], rel=0.01)
    assert row["precision"] in {"fp32", "bf16"}
    assert row["baseline_peak_mib"] > 0 and row["pipeline_peak_mib"] > 0
    (scoring_row,) = report["scoring"]
    assert scoring_row["n"] == 1000 and scoring_row["samples_per_s"] > 0 and scoring_row["score_s"] > 0
    assert " x" in stdout and "bench.json" in stdout  # the terminal table and where the JSON went


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_train_throughput_quick_mode_on_cuda(bench_project: Path) -> None:
    report, _ = quick_throughput(bench_project, "cuda")
    assert [row["device"] for row in report["training"]] == ["cuda"]
    assert report["training"][0]["precision"] == runtime.resolve_precision("auto", torch.device("cuda"))
    assert report["machine"]["cuda"] and report["scoring"][0]["device"] == "cuda"


@pytest.mark.slow
def test_lever_quality_compares_every_arm_over_seeds(bench_project: Path) -> None:
    # The reference the FIDs are computed against, made from the synthetic test images.
    classifier, sha = scoring.load_classifier(bench_project / "models/classifier-mnist.pt", 128, torch.device("cpu"))
    mnist = data.load_prepared(bench_project / "data/prepared/mnist.npz")
    features, _ = scoring.classify(classifier, mnist.test_images, 100, torch.device("cpu"))
    reference = scoring.compute_reference(features, mnist.test_labels, sha)
    scoring.save_reference(reference, bench_project / "data/reference/mnist.npz")
    out = bench_project / "quality.json"
    lever = '{"precision": "fp32", "fused_adam": false}'
    args = ["--steps", "2", "--seeds", "0", "1", "--fid-samples", "300", "--lever", lever, "--output", str(out)]
    result = run_script([str(ROOT / "benchmarks/lever_quality.py"), *args], bench_project)
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = json.loads(out.read_text())
    assert [(r["seed"], r["arm"]) for r in report["runs"]] == [
        (0, "default"), (0, '{"fused_adam": false, "precision": "fp32"}'),
        (1, "default"), (1, '{"fused_adam": false, "precision": "fp32"}'),
    ]  # fmt: skip
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in report["runs"])
    (comparison,) = report["comparisons"]
    assert comparison["verdict"] in {"within seed-to-seed noise", "outside seed-to-seed noise"}
    default = [r["fid"] for r in report["runs"] if r["arm"] == "default"]
    assert report["summary"]["default"]["mean"] == pytest.approx(np.mean(default), abs=1e-3)


@pytest.mark.slow
def test_ddp_scaling_quick_mode_reports_each_arm(tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    result = run_script([str(ROOT / "benchmarks/ddp_scaling.py"), "--quick", "--nprocs", "0", "2", "--output", str(out)],
                        tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["nproc"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {0, 2} and rows[2]["per_rank_batch"] == 32
    assert all(row["images_per_second"] > 0 for row in rows.values())
    assert "efficiency" in result.stdout
