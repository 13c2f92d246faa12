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

from benchmarks import peak_flops
from pipeline import data, files, machine
from pipeline.errors import UserError
from pipeline.scoring import frozen_classifier, scorer
from tests.conftest import ROOT, SMALL_MODEL, edit_params, synthetic_mnist


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip


@pytest.fixture
def bench_project(tmp_path: Path) -> Path:
    """A project folder as a fresh clone has it: params, the committed classifier, synthetic prepared data."""
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "models").mkdir()
    shutil.copy2(ROOT / "models/classifier-mnist.pt", tmp_path / "models/classifier-mnist.pt")
    data.save_prepared(synthetic_mnist(n_train=512, n_test=300), tmp_path / "data/prepared/mnist.npz")
    return tmp_path


def save_reference(project: Path) -> None:
    """The reference the FIDs are computed against, made from the synthetic test images."""
    classifier, sha = frozen_classifier.load_classifier(project / "models/classifier-mnist.pt", 128, torch.device("cpu"))
    mnist = data.load_prepared(project / "data/prepared/mnist.npz")
    features, _ = frozen_classifier.classify(classifier, mnist.test_images, 100, torch.device("cpu"))
    reference = scorer.compute_reference(features, mnist.test_labels, sha)
    scorer.save_reference(reference, project / "data/reference/mnist.npz")


def small_training(project: Path) -> None:
    """params.yaml with the tests' small model at batch 8, for the scripts that train or draw with its
    model: their reports have the same shape, for a fraction of the CPU time of the default DCGAN at
    batch 32 (whose figures no test asserts)."""
    edit_params(project, model=SMALL_MODEL, train={"batch_size": 8})


def lever_quality_here(project: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """benchmarks/lever_quality.py with these arguments, in this process: for arguments it refuses
    before it trains (no process of its own to start for a sentence)."""
    from benchmarks import lever_quality

    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", ["lever_quality.py", *args])
    lever_quality.main()


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
    assert row["keras_img_s"] > 0 and row["baseline_img_s"] > 0 and row["pipeline_img_s"] > 0
    assert row["speedup"] == pytest.approx(row["pipeline_img_s"] / row["baseline_img_s"], rel=0.01)
    assert row["speedup_vs_keras"] == pytest.approx(row["pipeline_img_s"] / row["keras_img_s"], rel=0.01)
    assert set(row["all_img_s"]) == {"keras", "baseline", "pipeline"}
    assert row["precision"] in {"fp32", "bf16"}
    assert row["baseline_peak_mib"] > 0 and row["pipeline_peak_mib"] > 0 and row["keras_peak_mib"] > 0
    # The Keras arm really trains: D changes in its own steps, not in G's (keras_tutorial.py --verify).
    assert row["keras"]["verify"]["d_step_changed_d"] > 0 and row["keras"]["verify"]["c_step_changed_d"] == 0
    assert report["keras"]["keras"].startswith("3.") and report["keras"]["backend"] == "tensorflow"
    threads = report["threads"]
    assert threads["tensorflow_intra_op"] == threads["torch_intra_op"] >= 1
    assert threads["tensorflow_inter_op"] == threads["torch_inter_op"] >= 1
    # The distance to the limit: peaks, FLOPs per step, GFLOP/s and fractions of the peak for every arm.
    peak = report["peak"]["cpu"]
    assert peak["fp32"]["gflops"] > 0 and peak["bf16"]["gflops"] > 0
    flops = row["flops_per_step"]
    assert flops["pipeline"] < flops["useful"] < flops["tutorial_loop"] < flops["baseline"]
    assert row["peak_precision"] == {"keras": "fp32", "baseline": "fp32", "pipeline": row["precision"]}
    for arm in ("keras", "baseline", "pipeline"):
        useful = flops["useful"] * row[f"{arm}_img_s"] / 32 / 1e9
        assert row["useful_gflop_s"][arm] == pytest.approx(useful, rel=0.01, abs=0.01)
        assert row["executed_gflop_s"][arm] > 0
        fraction = row["fraction_of_peak"][arm]
        assert np.isfinite(fraction) and fraction > 0
        assert fraction == pytest.approx(useful / peak[row["peak_precision"][arm]]["gflops"], rel=0.02, abs=1e-4)
    (scoring_row,) = report["scoring"]
    assert scoring_row["n"] == 1000 and scoring_row["samples_per_s"] > 0 and scoring_row["score_s"] > 0
    sha = files.sha256_file(bench_project / "data/prepared/mnist.npz")[:12]  # what the reference was made of
    assert scoring_row["reference"] == f"the test images of data/prepared/mnist.npz (sha256 {sha})"
    assert " x" in stdout and "% of peak" in stdout and "Keras" in stdout  # the terminal table
    assert "bench.json" in stdout  # and where the JSON went


@pytest.mark.slow
def test_scoring_levers_times_each_lever_off_to_the_same_scores(bench_project: Path) -> None:
    save_reference(bench_project)
    out = bench_project / "levers.json"
    script = str(ROOT / "benchmarks/scoring_levers.py")
    result = run_script([script, "--n", "1000", "--repeats", "1", "--output", str(out)], bench_project)
    assert result.returncode == 0, result.stderr[-3000:]
    arms = {row["arm"]: row for row in json.loads(out.read_text())["arms"]}
    assert arms["all on"]["off"] == [] and arms["all off"]["off"] == ["G layout", "heap", "classifier layout", "centre"]
    for row in arms.values():
        assert 0 < row["generate_s"] < row["total_s"] and 0 < row["classify_s"] < row["score_s"] < row["total_s"]
        assert 0 < row["prdc_s"] < row["score_s"] and row["exact_pairs"] > 0
    # Keeping the heap and the screen's centre change no arithmetic of the scores; the layouts of G
    # and the classifier change round-off only.
    assert arms["heap not kept"]["max_rel_score_diff"] == arms["PRDC from the origin"]["max_rel_score_diff"] == 0
    for arm in ("G NCHW", "classifier NCHW", "all off"):
        assert arms[arm]["max_rel_score_diff"] < 1e-3, arm
    assert "exact pairs" in result.stdout and "levers.json" in result.stdout


def test_train_throughput_without_tensorflow_names_the_extra(tmp_path: Path) -> None:
    """Without TensorFlow the Keras arm is not skipped quietly: one sentence names the extra to install."""
    hide_tensorflow = (
        "import runpy, sys; sys.modules['tensorflow'] = None; sys.path.insert(0, sys.argv[1]); "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0] + '/train_throughput.py', run_name='__main__')"
    )
    args = ["-c", hide_tensorflow, str(ROOT / "benchmarks"), "--quick", "--devices", "cpu", "--output", "x.json"]
    result = run_script(args, tmp_path)
    assert result.returncode != 0 and not (tmp_path / "x.json").exists()
    assert result.stderr.strip().splitlines()[-1] == (
        "The Keras arm needs TensorFlow and Keras 3, which this environment lacks: "
        "pip install -e '.[keras]' (or pass --no-keras to leave the arm out)."
    )


def test_flop_counter_counts_a_dense_layer_and_a_conv_by_hand() -> None:
    z, images = torch.randn(8, 100), torch.randn(2, 128, 14, 14, requires_grad=True)
    dense, conv = torch.nn.Linear(100, 6272), torch.nn.Conv2d(128, 64, 3, padding=1)
    assert peak_flops.count_flops(lambda: dense(z)) == 2 * 8 * 100 * 6272  # 2 FLOPs per multiply-add
    forward = 2 * 2 * 64 * 14 * 14 * (128 * 9)  # per output value: a 3x3 window over 128 channels
    assert peak_flops.count_flops(lambda: conv(images)) == forward
    out = conv(images)  # backward: the gradient of the input and of the weights, each as dear as the forward
    assert peak_flops.count_flops(lambda: out.sum().backward()) == 2 * forward


def test_step_flops_are_the_tutorials_model_math_counted_by_hand() -> None:
    """One iteration's FLOPs, from the layer sizes: what the fraction-of-peak figures rest on."""
    b = 4

    def conv(c_in: int, c_out: int, side_out: int) -> int:  # a 3x3 conv
        return 2 * b * c_out * side_out**2 * c_in * 9

    dense = 2 * b * 100 * 128 * 7 * 7
    g = dense + conv(128, 128, 14) + conv(128, 64, 28) + conv(64, 1, 28)  # upsample then conv, as Keras
    d_first = conv(1, 32, 14)
    d = d_first + conv(32, 64, 7) + conv(64, 128, 4) + conv(128, 256, 4) + 2 * b * 256 * 4 * 4
    # D on real, D on fake: forward, weight gradients, input gradients but the images'.
    d_steps = 2 * (d + d + (d - d_first))
    # G's update: D forward and input gradients (frozen: no weight gradients), G's weight and input gradients (not z's).
    g_step = d + d + g + (g - dense)
    flops = peak_flops.step_flops(b, {"precision": "fp32"}, torch.device("cpu"))
    assert flops["useful"] == g + d_steps + g_step  # G forward once, its output reused by both updates
    assert flops["tutorial_loop"] == flops["useful"] + g  # generator.predict, then G again in the combined model
    assert flops["pipeline"] < flops["useful"]  # the phased upsample convs: the same function, fewer FLOPs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_train_throughput_quick_mode_on_cuda(bench_project: Path) -> None:
    report, _ = quick_throughput(bench_project, "cuda")
    assert [row["device"] for row in report["training"]] == ["cuda"]
    assert report["training"][0]["precision"] == machine.resolve_precision("auto", torch.device("cuda"))
    assert report["machine"]["cuda"] and report["scoring"][0]["device"] == "cuda"


@pytest.mark.slow
def test_lever_quality_compares_every_arm_over_seeds(bench_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_reference(bench_project)
    edit_params(bench_project, evaluate={"fid_resamples": 10})
    small_training(bench_project)
    out, grids = bench_project / "quality.json", bench_project / "grids.png"
    lever, arm = '{"precision": "fp32", "fused_adam": false}', 'cond={"model.conditional": true, "train.ema_decay": 0.9, "train.watchdog": true}'
    args = ["--steps", "2", "--seeds", "0", "1", "--fid-samples", "300", "--lever", lever, "--arm", arm,
            "--speed-steps", "2", "--grids", str(grids), "--output", str(out)]  # fmt: skip
    result = run_script([str(ROOT / "benchmarks/lever_quality.py"), *args], bench_project)
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = json.loads(out.read_text())
    lever_arm = '{"fused_adam": false, "precision": "fp32"}'
    assert [(r["seed"], r["arm"]) for r in report["runs"]] == [
        (0, "default"), (0, "cond"), (0, lever_arm), (1, "default"), (1, "cond"), (1, lever_arm),
    ]  # fmt: skip
    assert report["arms"][lever_arm] == {"train.precision": "fp32", "train.fused_adam": False}
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in report["runs"])
    assert [c["arm"] for c in report["comparisons"]] == ["cond", lever_arm]
    from scipy import stats

    for c in report["comparisons"]:  # Welch's interval of the difference of the mean FIDs, by hand
        a, b = ([r["fid"] for r in report["runs"] if r["arm"] == arm] for arm in (c["arm"], "default"))
        va, vb = np.var(a, ddof=1) / 2, np.var(b, ddof=1) / 2
        half = stats.t.ppf(0.975, (va + vb) ** 2 / (va**2 + vb**2)) * np.sqrt(va + vb)
        assert c["interval"] == pytest.approx([c["difference"] - half, c["difference"] + half], abs=2e-3)
        assert c["verdict"] == ("within noise" if abs(c["difference"]) <= half else "a real gain" if c["difference"] < 0 else "a real loss")
    assert all(r["fid_low"] < r["fid"] < r["fid_high"] for r in report["runs"])
    default = [r["fid"] for r in report["runs"] if r["arm"] == "default"]
    assert report["summary"]["default"]["mean"] == pytest.approx(np.mean(default), abs=1e-3)
    assert report["speed_img_s"].keys() == report["arms"].keys() and min(report["speed_img_s"].values()) > 0
    assert grids.is_file() and "FID mean" in result.stdout
    with pytest.raises(UserError, match=r"train\.ema_decay"):  # before any arm trains
        lever_quality_here(bench_project, monkeypatch, "--arm", 'x={"train.ema_decay": 2}')


def test_lever_quality_runs_part_of_the_study(bench_project: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    save_reference(bench_project)
    edit_params(bench_project, evaluate={"fid_resamples": 10})
    small_training(bench_project)
    out, script = bench_project / "quality.json", str(ROOT / "benchmarks/lever_quality.py")
    args = ["--study", "--arms", "quality preset", "--steps", "2", "--seeds", "0", "--fid-samples", "300",
            "--output", str(out)]  # fmt: skip
    result = run_script([script, *args], bench_project)
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = json.loads(out.read_text())
    assert list(report["arms"]) == ["quality preset"] and report["arms"]["quality preset"]["model.conditional"]
    assert [r["arm"] for r in report["runs"]] == ["quality preset"] and report["comparisons"] == []
    with pytest.raises(SystemExit) as bad:
        lever_quality_here(bench_project, monkeypatch, "--study", "--arms", "tutorial", "qualty preset")
    error = capsys.readouterr().err
    assert bad.value.code == 2 and "--arms picks from the study's arms" in error, error
    remedies = run_script([script, "--remedies", "--steps", "2", "--seeds", "0", "--fid-samples", "300",
                           "--output", str(out)], bench_project)  # fmt: skip
    assert remedies.returncode == 0, remedies.stderr[-3000:]
    report = json.loads(out.read_text())[-1]
    assert list(report["arms"])[0] == "quality preset" and len(report["arms"]) == 4
    assert {c["interval_from"] for c in report["comparisons"]} == {"one seed: the draw's noise only"}
    assert "preset + r1 0.1 - quality preset:" in remedies.stdout


def test_profile_step_splits_the_step_into_its_phases(bench_project: Path) -> None:
    small_training(bench_project)
    out = bench_project / "profile.json"
    args = ["--steps", "2", "--warmup", "1", "--devices", "cpu", "--output", str(out)]
    result = run_script([str(ROOT / "benchmarks/profile_step.py"), *args], bench_project)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    phases = run["phases"]
    assert list(phases) == ["G forward", "D real (fwd+bwd)", "D fake (fwd+bwd)", "G update", "optimiser", "other"]
    # Every labelled phase ran, and with "other" (the rest) they make up the step.
    assert all(phases[name]["ms"] > 0 for name in list(phases)[:-1])
    assert sum(row["ms"] for row in phases.values()) == pytest.approx(run["step_ms"], rel=1e-3, abs=1e-3)
    assert run["top_ops"] and run["top_ops"][0]["self_ms"] >= run["top_ops"][-1]["self_ms"] > 0
    assert "G update" in result.stdout


@pytest.mark.slow
def test_ddp_scaling_quick_mode_reports_each_arm(tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    args = ["--quick", "--nprocs", "0", "2", "--batch-size", "16", "--output", str(out)]  # 8 a rank: the split, cheaply
    result = run_script([str(ROOT / "benchmarks/ddp_scaling.py"), *args], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["nproc"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {0, 2} and rows[0]["per_rank_batch"] == 16 and rows[2]["per_rank_batch"] == 8
    assert all(row["images_per_second"] > 0 for row in rows.values())
    assert "efficiency" in result.stdout


@pytest.mark.slow
def test_shared_machine_quick_mode_times_one_job_and_two_with_and_without_a_share(bench_project: Path) -> None:
    result = run_script([str(ROOT / "benchmarks/shared_machine.py"), "--quick", "--batch-size", "8"], bench_project)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["batch_size"] == 8  # --quick's few steps, of a batch cheaper than the default's 32
    arms = {(row["jobs"], row["threads"]): row for row in report["rows"]}
    share = max(1, report["cores"] // 2)
    assert set(arms) == {(1, 0), (2, 0), (2, share)}
    assert [len(r) for r in arms[(2, share)]["repeats"]] == [2]  # two processes, one repeat
    assert all(row["img_s_per_job"] > 0 for row in arms.values())


def test_fid_interval_scores_fresh_draws_beside_the_bootstrap(bench_project: Path) -> None:
    from pipeline import files
    from pipeline.gan.architectures import build_generator
    from pipeline.params import load_params

    save_reference(bench_project)
    edit_params(bench_project, evaluate={"fid_resamples": 10})
    small_training(bench_project)
    torch.manual_seed(0)
    generator = build_generator(load_params(bench_project / "params.yaml").model, n_classes=10)
    files.save_checkpoint({"generator": generator.state_dict()}, bench_project / "models/generator.pt")
    result = run_script([str(ROOT / "benchmarks/fid_interval.py"), "--draws", "3", "--n", "300"], bench_project)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row["seed"] for row in rows] == [1234, 1235, 1236]
    assert all(row["low"] < row["fid"] < row["high"] for row in rows) and len({row["fid"] for row in rows}) == 3
    assert "N=300, 3 draws, 10 resamples" in result.stdout and "intervals hold the mean" in result.stdout


def test_lever_forms_times_every_form_and_names_the_fastest(bench_project: Path) -> None:
    small_training(bench_project)
    out = bench_project / "forms.json"
    args = ["--batch-sizes", "8", "--repeats", "2", "--steps", "1", "--output", str(out)]
    result = run_script([str(ROOT / "benchmarks/lever_forms.py"), *args], bench_project)
    assert result.returncode == 0, result.stderr[-3000:]
    (table,) = json.loads(out.read_text())["batches"]
    assert table["batch"] == 8 and len(table["img_s"]) == 12  # 3 x 2 x 2 forms (levers.FORMS)
    assert all(len(runs) == 2 for runs in table["runs"].values())
    fastest = json.dumps(table["fastest"], sort_keys=True)
    assert table["img_s"][fastest] == max(table["img_s"].values())
    default = table["img_s"][json.dumps({"channels_last": False, "fast_output": True, "fast_upsample": True})]
    assert table["fastest_over_defaults"] == pytest.approx(table["img_s"][fastest] / default, abs=1e-3)
    assert "<- auto" in result.stdout


def test_trace_run_looks_at_a_run_without_changing_it(bench_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_reference(bench_project)
    small_training(bench_project)
    monkeypatch.chdir(bench_project)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from benchmarks import trace_run

    arm = {"model.conditional": True, "train.ema_decay": 0.9, "train.batch_size": 8, "train.fid_samples": 256,
           "train.watchdog": True, "train.watchdog_every": 2}
    looks, traced = trace_run.trace("params.yaml", arm, 0, 4, 2)
    assert [look["step"] for look in looks] == [2, 4]
    keys = {"fid_g", "fid_ema", "classes_covered", "d_loss", "d_acc", "g_loss", "d_logit_real", "d_logit_fake",
            "d_logit_gap", "d_grad_norm", "g_grad_norm"}  # fmt: skip
    assert all(keys <= look.keys() and all(np.isfinite(look[k]) for k in keys) for look in looks)
    assert all(look["d_logit_gap"] == pytest.approx(look["d_logit_real"] - look["d_logit_fake"], abs=2e-4) for look in looks)
    _, looked_at_the_end = trace_run.trace("params.yaml", arm, 0, 4, 4)  # no look before the last step
    pairs = ((traced.generator, looked_at_the_end.generator), (traced.discriminator, looked_at_the_end.discriminator),
             (traced.ema, looked_at_the_end.ema))  # fmt: skip
    for a, b in pairs:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert traced.history == looked_at_the_end.history
