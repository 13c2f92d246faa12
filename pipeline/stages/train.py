"""Stage `train`: resume or start, run the GAN core's loop (gan/loop.py), write its files and MLflow run.

A SIGTERM, SIGINT or SIGHUP while training (a scheduler's time limit, Ctrl-C, `docker stop`)
stops it at the next step (a job: the next logging step) with that step's checkpoint, from
which the same command resumes bit-identically (see run()); one training at a time runs in a
working directory (see main()). The `Writer` is what the loop's callbacks do here: the
writing process's files (DVC outputs) and MLflow run.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline import checkpoint_history, data, distributed, files, machine, signals
from pipeline.distributed import World
from pipeline.errors import UserError
from pipeline.gan import levers, watchdog
from pipeline.gan.export import for_export
from pipeline.gan.loop import FINAL, Callbacks, metric_rows, summarise, summary_row, train
from pipeline.gan.resume import checkpoint_fingerprint, resume_or_fresh
from pipeline.gan.sampling import fixed_noise, sample_grid
from pipeline.gan.state import LOG_COLUMNS, Row, TrainState
from pipeline.layout import Layout
from pipeline.params import Params, flatten, load_params

if TYPE_CHECKING:
    from pipeline.gan.watchdog import Event
    from pipeline.scoring.scorer import Scorer
    from pipeline.tracking.tracker import Run


# --- the stage: resume, the writing process's files and MLflow run -------------------------


def trained_speed(summary: Path, step: int) -> dict[str, float]:
    """`seconds` and `images_per_second` of metrics/train.json when it is of `step`; else nothing."""
    try:
        old = files.read_json(summary) if summary.exists() else {}
    except UserError:
        return {}
    return (
        {k: old[k] for k in ("seconds", "images_per_second") if k in old} if old.get("step") == step else {}
    )


def write_log(history: list[Row], path: Path) -> None:
    with files.atomic_open(path) as fh:
        fh.write("step," + ",".join(LOG_COLUMNS) + "\n")
        for step, *values in history:
            # 9 digits give back each float32 loss exactly, so `resend` can rebuild MLflow's record.
            fh.write(f"{step}," + ",".join(f"{v:.9g}" for v in values) + "\n")


def write_fid_log(fid_history: list[tuple[int, float]], path: Path) -> None:
    with files.atomic_open(path) as fh:
        fh.write("step,fid_quick\n" + "".join(f"{step},{float(fid)!r}\n" for step, fid in fid_history))


def start_tracking(
    params: Params, run_id: str | None, device: torch.device, precision: str, data_hash: str, world: World
) -> tuple[Run, dict[str, str]]:
    """The training run in MLflow (the checkpoint's run when resuming), its params logged; and run_info."""
    from pipeline.tracking import connection, runs

    env = dict(os.environ)
    uri, experiment_id, root = connection.open_experiment(params.tracking.experiment, Path.cwd(), env)
    tags = {
        **connection.run_tags("train", params, env, root, device),
        "precision": precision,
        "cuda": torch.version.cuda or "none",
        "data.sha256": data_hash,
        # the job: one process, or data-parallel over world_size ranks of per_rank_batch images each
        "dist.world_size": str(world.size),
        "dist.backend": world.backend or "none",
        "dist.per_rank_batch": str(params.train.batch_size // world.size),
        "threads": str(torch.get_num_threads()),  # per process; train.threads, or torch's choice for 0
    }
    run = runs.open_run(experiment_id, connection.run_name(env), tags, resume_run_id=run_id)
    run.log_params(flatten(params))
    print(f"MLflow run {run.run_id} in experiment '{params.tracking.experiment}' at {connection.redact(uri)}")
    run_info = {
        "run_id": run.run_id,
        "experiment_id": experiment_id,
        "tracking_uri": connection.redact(uri),
        "params_sha256": files.fingerprint(flatten(params)),
    }
    return run, run_info


def sample_file(paths: Layout, step: int) -> Path:
    return paths.samples / f"step_{step:06d}.png"


class Writer:
    """Every side effect of the stage: DVC outputs, the MLflow run, the progress bar.

    Only the writing process has one (see main); train() reports to it through Callbacks.
    """

    def __init__(
        self,
        params: Params,
        paths: Layout,
        fingerprint: str,
        run: Run,
        run_info: dict[str, str],
        state: TrainState,
        desc: str,
    ) -> None:
        from tqdm import tqdm

        self.params, self.paths, self.fingerprint = params, paths, fingerprint
        self.run_info = run_info
        # A resumed run already holds the steps between its last checkpoint and the kill: each
        # step goes to MLflow once (their values are the same again, bit for bit, on the CPU).
        self.logged_until, self.logged_grids, self.fid_logged_until, self.looks_logged_until = 0, set(), 0, 0
        self.ends_logged: set[int] = set()  # the steps whose `final_*` figures the run holds
        self._scorer: Scorer | None = None
        recorded = False
        if state.step:
            try:
                # The grids a kill left half-uploaded are deleted here: those steps are uploaded again, whole.
                self.logged_until, self.logged_grids = run.logged_steps("g_loss", "samples")
                self.fid_logged_until = max(run.metric_steps("fid_quick"), default=0)
                self.looks_logged_until = max(run.metric_steps("watchdog_fid"), default=0)
                self.ends_logged = run.metric_steps(f"final_{FINAL[-1]}")
                if state.step == params.train.steps:  # a finished run again: did its end reach MLflow?
                    recorded = state.step in self.ends_logged and run.has_model()
            except Exception:  # noqa: BLE001 - a server that fails here fails the logging below, where it is said
                pass
        # A finished run run again (its outputs deleted, or `dvc repro -f`) writes its outputs again;
        # MLflow holds its end already, which is not logged twice.
        from pipeline.tracking.runs import Recorded

        self.run: Run | Recorded = Recorded(run) if recorded else run
        self.bar = tqdm(
            total=params.train.steps, initial=state.step, desc=desc, unit="step", dynamic_ncols=True
        )

    @classmethod
    def open(
        cls,
        params: Params,
        paths: Layout,
        state: TrainState,
        resumed: str | None,
        fingerprint: str,
        device: torch.device,
        precision: str,
        data_hash: str,
        world: World = World(),
        levers_chosen: str | None = None,
    ) -> Writer:
        """Clear what a killed or earlier run left, then open the MLflow run (state.run_id when resuming),
        tagged with the speed levers' forms chosen for `auto` (gan/levers.py)."""
        files.remove_stale_temps(*paths.outputs("train"), paths.checkpoint)
        for said in (resumed, levers_chosen):
            if said:
                print(said)
        run, run_info = start_tracking(params, state.run_id, device, precision, data_hash, world)
        if levers_chosen:
            run.set_tags({"levers": levers_chosen})
        state.run_id = run.run_id  # into every checkpoint, so that a resumed run logs to the same run
        if state.step == 0:  # a fresh run: nothing from an earlier run may survive in persisted outputs
            for old in paths.samples.glob("*.png"):
                old.unlink()
            paths.fid_log.unlink(missing_ok=True)
        for step, grid in state.grids.items():  # the grids of a resumed run whose files are gone
            if not sample_file(paths, step).exists():
                data.save_png(grid, sample_file(paths, step))
        where = f"{device.type} x{world.size}" if world.distributed else device.type
        return cls(params, paths, fingerprint, run, run_info, state, f"train [{where}, {precision}]")

    def callbacks(self, device: torch.device) -> Callbacks:
        watch = self.params.train.watchdog
        return Callbacks(
            self.on_log,
            self.on_sample,
            self.on_checkpoint,
            self.quick_fid(device),
            self.watch(device) if watch else None,
            self.on_rescue if watch else None,
        )

    def scorer(self, device: torch.device) -> Scorer:
        """The frozen classifier with its reference, loaded once (quick FID, watchdog)."""
        from pipeline.scoring.scorer import Scorer

        if self._scorer is None:
            self._scorer = Scorer.load(self.paths, self.params, device)
        return self._scorer

    def on_log(self, rows: list[Row], rate: float) -> None:
        step, d_loss, d_acc, g_loss = rows[-1]
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(
            f"D loss {d_loss:.3f}, acc {100 * d_acc:.1f}% | G loss {g_loss:.3f} | {rate:,.0f} img/s"
        )
        self.run.log_metrics(metric_rows([row for row in rows if row[0] > self.logged_until]))

    def on_sample(self, step: int, grid: np.ndarray) -> None:
        data.save_png(grid, sample_file(self.paths, step))
        if step not in self.logged_grids:
            self.run.log_image(grid, key="samples", step=step)

    def on_checkpoint(self, state: TrainState) -> None:
        files.save_checkpoint(state.to_checkpoint(self.fingerprint), self.paths.checkpoint)
        write_log(state.history, self.paths.train_log)

    def quick_fid(self, device: torch.device) -> Callable[[TrainState], None] | None:
        """With train.fid_every: the in-training FID, on the frozen classifier's features."""
        p = self.params.train
        if not p.fid_every:
            return None
        scorer = self.scorer(device)

        def on_eval(state: TrainState) -> None:
            fid = scorer.quick_fid(state.output, self.params)
            state.fid_history.append((state.step, fid))
            self.bar.write(f"step {state.step}: quick FID ({p.fid_samples} samples) {fid:.3f}")
            if state.step > self.fid_logged_until:
                self.run.log_metrics([{"step": state.step, "fid_quick": fid}])
            write_fid_log(state.fid_history, self.paths.fid_log)

        return on_eval

    def watch(self, device: torch.device) -> Callable[[TrainState], float]:
        """The watchdog's judge: the quick FID, with the classes covered and D's accuracy into MLflow."""
        scorer = self.scorer(device)

        def on_watch(state: TrainState) -> float:
            signals = scorer.watch(state.output, self.params)
            row = watchdog.watched_row(state, self.params.train.watchdog_every, signals)
            state.watch.looks.append(row)  # type: ignore[union-attr] - only called with the watchdog on
            if state.step > self.looks_logged_until:
                self.run.log_metrics([row])
            return signals["fid"]

        return on_watch

    def on_rescue(self, event: Event) -> None:
        """A rescue: on the progress bar, in MLflow (tags, and a metric at the step of the collapse); the
        steps trained again after the rollback are logged again."""
        self.bar.write(event.sentence())
        self.bar.n = event.back_to
        self.bar.refresh()
        self.run.set_tags(event.tags())
        self.run.log_metrics([event.metric()])
        self.logged_until = min(self.logged_until, event.back_to)
        self.fid_logged_until = min(self.fid_logged_until, event.back_to)
        self.looks_logged_until = min(self.looks_logged_until, event.back_to)

    def holds_model(self, weights: dict[str, torch.Tensor]) -> bool:
        """Whether the run holds a finished model of exactly these weights (False when MLflow cannot say)."""
        from pipeline.tracking import logged_model

        try:
            return self.run.has_model(logged_model.tensors_sha256(weights))
        except Exception:  # noqa: BLE001 - the upload that follows says what failed
            return False

    def fail(self, exc: BaseException) -> None:
        """End the MLflow run as the stage ends: KILLED, FAILED, or, when this session added nothing
        to it (a resume at its last step), the status it had before; a status MLflow could not
        take is said in the error's sentence."""
        self.bar.close()
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        if self.bar.n == self.bar.initial and self.run.previous_status == "FINISHED":
            status = (
                "FINISHED"  # its record is what it was when it finished: a failed no-op must not undo that
            )
        self.run.finish(status)
        if isinstance(exc, UserError) and any(item.kind == "run status" for item in self.run.lost):
            exc.args = (
                f"{str(exc).rstrip('.')}; MLflow could not mark run {self.run.run_id} {status} either "
                f"({self.run.failure}), so it shows RUNNING until the next stage start marks it KILLED.",
            )

    def finish(self, state: TrainState, summary: dict[str, Any], last_grid: np.ndarray) -> None:
        """The DVC outputs, then what MLflow gets at the end; says what it did not get."""
        self.bar.close()
        paths = self.paths
        try:
            with files.atomic_files():  # all of them, or (a full disk) none: never new beside old
                # The generator the run gives (the EMA of G with train.ema_decay), and the trained G beside it.
                raw = {"generator_raw": state.generator.state_dict()} if state.ema is not None else {}
                files.save_checkpoint({"generator": state.given().state_dict(), **raw}, paths.generator)
                write_log(state.history, paths.train_log)
                write_fid_log(state.fid_history, paths.fid_log)  # header only when train.fid_every is 0
                files.write_json(paths.train_watchdog, watchdog.record(state.watch))
                data.save_png(last_grid, paths.last_samples)
                files.write_json(paths.run_info, self.run_info)
                files.write_json(paths.train_metrics, summary)
        except BaseException as exc:
            self.fail(exc)  # main's handler covers train() only: the run must not stay RUNNING
            raise

        # A resume replayed from an earlier checkpoint ends where the run has ended before: its end, and
        # its model of the same weights (bit for bit again on the CPU), are in MLflow once already.
        if summary["step"] not in self.ends_logged:
            self.run.log_metrics([summary_row(summary)])
        self.run.log_artifact(paths.train_log)
        if dropped := self.run.drop_unfinished_models():  # a kill during an earlier upload
            print(
                f"removed {dropped} unfinished logged model(s) of MLflow run {self.run.run_id}, left by an "
                "interrupted upload."
            )
        weights = state.given().state_dict()
        if not (self.ends_logged and self.holds_model(weights)):
            self.run.log_model(*for_export(self.params.model, weights, state.generator.n_classes))
        self.run.finish()
        print(
            f"step {summary['step']}: D loss {summary['d_loss']:.4f}, D acc {100 * summary['d_acc']:.1f}%, "
            f"G loss {summary['g_loss']:.4f} ({summary['seconds']:.0f} s, {summary['images_per_second']:,.0f} img/s) "
            f"-> {paths.generator}"
        )
        if self.run.lost:
            print(
                f"warning: {self.run.lost_summary()}; the outputs are complete, and `python -m pipeline resend` "
                "sends them once the server is back.",
                file=sys.stderr,
            )


def main(params_path: Path = Path("params.yaml")) -> None:
    params = load_params(params_path)
    p, paths, env = params.train, Layout(dataset=params.data.dataset), dict(os.environ)
    if p.nproc > 1 and not distributed.under_torchrun(env):
        with one_training(paths):
            os.environ[LOCK_HOLDER] = str(os.getpid())  # its ranks: this process holds the lock for them
            distributed.launch(p.nproc, params_path)  # the same command, as p.nproc processes of one job
        return
    device = machine.pick_device(p.device)
    machine.use_threads(p.threads)
    world = World()
    if distributed.under_torchrun(env):
        size = int(env["WORLD_SIZE"])
        if p.batch_size % size:
            raise UserError(
                f"train.batch_size={p.batch_size} does not split evenly over {size} processes; "
                f"make it a multiple of {size}."
            )
        world, device = distributed.join(device, env, timeout_s=p.dist_timeout_s)
    try:
        # Rank 0 of a job holds the lock, unless the process that launched it (train.nproc) does already.
        held = not world.writer or (world.distributed and env.get(LOCK_HOLDER) == str(os.getppid()))
        with contextlib.nullcontext() if held else one_training(paths):
            run(params, paths, device, world)
    finally:
        distributed.leave(world)


LOCK_HOLDER = "PIPELINE_TRAIN_LOCK_PID"  # set by a launching process for the ranks it starts


def one_training(paths: Layout) -> contextlib.AbstractContextManager[None]:
    """One training at a time in this working directory: a second one would log every step twice and
    remove the first one's model upload."""
    return signals.exclusive(paths.train_lock, "a training")


def starting_state(
    params: Params, paths: Layout, fingerprint: str, device: torch.device, n_classes: int, world: World
) -> tuple[TrainState, str | None]:
    """The state to train from, resumed from the checkpoint of these params if there is one (the
    history's, when checkpoints/train.pt is another run's), and what was found, to say."""
    p = params.train
    # Rank 0 reads the checkpoint for everyone: other machines of a job need not share its disk.
    ckpt = None
    if world.writer:
        ckpt, moved = checkpoint_history.prepare(paths.checkpoint, fingerprint, p.steps, p.keep_checkpoints)
        if moved:
            print(moved)
    ckpt = distributed.broadcast(world, ckpt)
    return resume_or_fresh(params, ckpt, paths.checkpoint, fingerprint, device, n_classes, world)


def run(params: Params, paths: Layout, device: torch.device, world: World) -> None:
    """The stage in one process (of a job, or the only one): resume or start, train, write."""
    p = params.train
    precision = machine.resolve_precision(p.precision, device)
    if world.writer and device.type == "cpu" and (advice := machine.busy_now()):
        print(f"warning: {advice}", file=sys.stderr)
    n_classes = len(data.class_names(params.data))
    dataset = data.load_prepared(paths.prepared, n_classes)
    data_hash = files.sha256_file(paths.prepared)
    # The `auto` speed levers' forms, chosen by rank 0 for every rank: from here on, the run's params.
    params, chosen = distributed.broadcast(
        world, levers.choose(params, device, n_classes) if world.writer else None
    )
    p = params.train
    fingerprint = checkpoint_fingerprint(params, data_hash, precision)
    state, how = starting_state(params, paths, fingerprint, device, n_classes, world)

    # The one gate: only the writing process touches files, MLflow and the terminal.
    writer = (
        Writer.open(params, paths, state, how, fingerprint, device, precision, data_hash, world, chosen)
        if world.writer
        else None
    )
    if writer:
        sizes = {"images": len(dataset.train_labels), "classes": n_classes}
        writer.run.log_dataset(params.data.dataset, data_hash, paths.prepared, "training", sizes)

    images = torch.from_numpy(dataset.train_images).to(device)
    labels = torch.from_numpy(dataset.train_labels).to(device) if params.model.conditional else None
    started, first_step = time.perf_counter(), state.step
    stop = signals.StopRequest()
    try:
        # Until training ends, a SIGTERM, SIGINT or SIGHUP stops it at a step it can resume from. A
        # rank of a job may get each signal twice (from its launcher, and from systemd or Slurm, which
        # signal every process): its launcher, not a second signal, stops it at once (torch's kills
        # the ranks that outlast its grace period).
        with signals.stop_on_signals(stop, second_stops_at_once=not world.distributed):
            callbacks = writer.callbacks(device) if writer else Callbacks()
            train(state, images, p, params.model.latent_dim, callbacks, world, labels, stop)
            # after the last step's look (its checkpoint is written)
            if stop.signum and not world.distributed:
                raise signals.Stopped(stop.signum)
    except signals.Stopped as exc:
        if writer:
            writer.fail(exc)
            exc.message = signals.stopped_sentence(exc, state.step, paths.checkpoint)
        raise
    except BaseException as exc:
        if writer:
            writer.fail(exc)
        raise
    if writer:
        summary = summarise(state, time.perf_counter() - started, first_step, p.batch_size)
        if first_step == p.steps:  # nothing trained now: the speed stays that of the session that trained
            summary.update(trained_speed(paths.train_metrics, first_step))
        writer.finish(
            state, summary, sample_grid(state.given(), fixed_noise(params.model.latent_dim, p.seed, device))
        )
