"""The remedies for unstable runs (gan/remedies.py): R1, differentiable augmentation and the EMA's
warm-up, each against a hand computation, and runs with them that resume bit-identically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import files, optuna_study
from pipeline.gan import loop
from pipeline.gan.architectures import build_discriminator
from pipeline.gan.loop import Callbacks, decay_learning_rates, lr_share
from pipeline.gan.remedies import EmaWarmup, Remedies, cutout, diff_augment, r1_penalty, translate
from pipeline.gan.resume import checkpoint_fingerprint
from pipeline.gan.state import ema, new_state
from pipeline.gan.watchdog import Watch
from pipeline.params import ModelParams, Params, TrainParams
from tests.conftest import CPU, SMALL_MODEL, TINY_TRAIN, train_tiny
from tests.test_levers import everything


def shifted_by_hand(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.full_like(image, -1.0)
    h, w = image.shape
    for r in range(h):
        for c in range(w):
            if 0 <= r - dy < h and 0 <= c - dx < w:
                out[r, c] = image[r - dy, c - dx]
    return out


def test_translation_and_cutout_match_a_hand_computation() -> None:
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    shifts = torch.tensor([[2, -3], [0, 0], [-1, 3]])
    moved = translate(x, shifts)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        assert np.array_equal(moved[i, 0].numpy(), shifted_by_hand(x[i, 0].numpy(), dy, dx))
    corners = torch.tensor([[0, 0], [20, -5], [-7, 26]])
    cut = cutout(x, corners, 14)
    for i, (top, left) in enumerate(corners.tolist()):
        expected = x[i, 0].numpy().copy()
        expected[max(top, 0) : max(top + 14, 0), max(left, 0) : max(left + 14, 0)] = -1.0
        assert np.array_equal(cut[i, 0].numpy(), expected)


def test_augmentation_is_differentiable_and_each_image_gets_its_own_draw() -> None:
    x = (torch.rand(64, 1, 28, 28) * 2 - 1).requires_grad_(True)
    torch.manual_seed(0)
    seen = diff_augment(x, ("translation", "cutout"))
    seen.sum().backward()
    # every pixel still in view passes its gradient on; moved-out and cut-out ones get none
    assert x.grad is not None and 0 < (x.grad != 0).float().mean() < 1
    torch.manual_seed(0)
    assert torch.equal(diff_augment(x.detach(), ("translation", "cutout")), seen.detach())  # seeded
    blanked = (seen.detach() == -1).flatten(1).float().mean(1)
    assert len(set(blanked.tolist())) > 10  # not one draw for the whole batch
    assert Remedies().view(x) is x  # off: the images themselves


def test_r1_is_half_gamma_times_the_squared_input_gradient() -> None:
    """A linear D has the input gradient w everywhere: R1 = gamma / 2 |w|^2, whatever the images."""
    weight = torch.randn(784)
    real = torch.rand(5, 1, 28, 28).requires_grad_(True)
    logits = real.flatten(1) @ weight + 0.3
    assert r1_penalty(logits, real, 10.0).item() == pytest.approx(5.0 * float(weight @ weight), rel=1e-5)


def test_r1_of_the_dcgan_discriminator_matches_finite_differences() -> None:
    torch.manual_seed(0)
    d = build_discriminator(ModelParams(**SMALL_MODEL), n_classes=10).double().eval()
    real = (torch.rand(2, 1, 28, 28, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    penalty = r1_penalty(d(real, None), real, 2.0).item()
    eps, by_hand = 1e-6, 0.0
    with torch.no_grad():  # every pixel nudged up and down, in one batch (eval mode: images independent)
        for image in real.detach():
            nudges = torch.eye(784, dtype=torch.float64).view(784, 1, 28, 28) * eps
            logits = d(torch.cat([image + nudges, image - nudges]), None)
            by_hand += float(((logits[:784] - logits[784:]) / (2 * eps)).square().sum())
    assert penalty == pytest.approx(2.0 / 2 * by_hand / 2, rel=1e-5)


def test_lazy_r1_is_every_kth_step_from_the_first_with_gamma_times_k(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [Remedies(0.5, (), 3).r1_at(step) for step in range(7)] == [1.5, 0, 0, 1.5, 0, 0, 1.5]
    assert {Remedies(0.5).r1_at(step) for step in range(5)} == {0.5}  # r1_every 1: every step, as before
    assert {Remedies(0.0, (), 3).r1_at(step) for step in range(5)} == {0.0}
    given: list[tuple[int, float]] = []  # (train_step calls so far, gamma) of each penalty the loop adds
    calls, step, penalty = [0], loop.train_step, loop.r1_penalty

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return step(*args, **kwargs)

    def recording(logits, real, gamma):  # type: ignore[no-untyped-def]
        given.append((calls[0], gamma))
        return penalty(logits, real, gamma)

    monkeypatch.setattr(loop, "train_step", counting)
    monkeypatch.setattr(loop, "r1_penalty", recording)
    lazy = everything(train_tiny(5, r1_gamma=0.5, r1_every=2))
    assert given == [(1, 1.0), (3, 1.0), (5, 1.0)]  # steps 0, 2 and 4 (the 1st, 3rd and 5th calls)
    given.clear()
    every = everything(train_tiny(5, r1_gamma=0.5))
    assert [gamma for _, gamma in given] == [0.5] * 5
    assert any(not torch.equal(lazy[k], every[k]) for k in lazy)


def test_the_ema_warmup_ramps_the_decay_by_hand() -> None:
    """e_1 = p_1 (the first update copies), then e_t = d_t e_(t-1) + (1 - d_t) p_t, d_t = decay min(1, t / W)."""
    net = torch.nn.Linear(3, 2)
    average = ema(net, 0.9, warmup=4)
    assert isinstance(average.multi_avg_fn, EmaWarmup)
    expected = None
    for t in range(1, 8):
        with torch.no_grad():
            net.weight.copy_(torch.full((2, 3), float(t * t)))
        average.multi_avg_fn.step = t
        average.update_parameters(net)
        d = 0.9 * min(1.0, t / 4)
        expected = float(t * t) if expected is None else d * expected + (1 - d) * t * t
        assert average.module.weight[0, 0].item() == pytest.approx(expected, rel=1e-6), t


def test_a_short_warm_run_is_not_the_average_of_its_initial_weights() -> None:
    """At step 3 of a 1,000-step warm-up, the EMA has moved with G; without the warm-up it sits at the
    initial weights (decay 0.999)."""
    cold, warm = train_tiny(3, ema_decay=0.999), train_tiny(3, ema_decay=0.999, ema_warmup=1000)
    start = train_tiny(1, ema_decay=0.999).generator.state_dict()
    key = next(k for k, v in start.items() if v.is_floating_point() and "weight" in k)

    def moved(state) -> float:  # type: ignore[no-untyped-def]
        return float((state.ema.module.state_dict()[key] - start[key]).abs().max())

    assert moved(warm) > 100 * moved(cold)


@pytest.mark.parametrize(
    "remedies",
    [
        {"r1_gamma": 1.0},
        {"r1_gamma": 1.0, "r1_every": 2},  # resumed at step 3, between two R1 steps
        {"augment": "translation,cutout"},
        {"ema_decay": 0.99, "ema_warmup": 4, "r1_gamma": 0.5},
    ],
    ids=["r1", "lazy r1", "augment", "all"],
)
def test_runs_with_remedies_resume_bit_identically(tmp_path: Path, remedies: dict) -> None:
    saved = tmp_path / "ckpt.pt"
    first = train_tiny(3, **remedies)
    files.save_checkpoint(first.to_checkpoint("fp"), saved)
    resumed = new_state(ModelParams(**SMALL_MODEL), TrainParams(**{**TINY_TRAIN, **remedies, "steps": 3}), CPU, 10)
    torch.manual_seed(12345)
    resumed.restore(files.load_checkpoint(saved))
    a, b = train_tiny(6, state=resumed, **remedies), train_tiny(6, **remedies)
    wa, wb = everything(a), everything(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.history == b.history
    plain = everything(train_tiny(6))
    assert any(not torch.equal(wa[k], plain[k]) for k in plain)  # the remedy changed the run


def test_a_remedy_param_out_of_range_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="augment"):
        TrainParams(augment="flip")
    with pytest.raises(ValueError, match="r1_gamma"):
        TrainParams(r1_gamma=-1.0)
    with pytest.raises(ValueError, match="r1_every"):
        TrainParams(r1_every=0)
    with pytest.raises(ValueError, match="lr_decay_from"):
        TrainParams(lr_decay_from=1.5)


def test_the_learning_rates_decay_linearly_from_the_given_fraction_of_the_run() -> None:
    decaying = TrainParams(**{**TINY_TRAIN, "steps": 10, "lr_decay_from": 0.5})
    assert [lr_share(decaying, step) for step in range(10)] == pytest.approx([1] * 6 + [0.8, 0.6, 0.4, 0.2])
    assert {lr_share(TrainParams(steps=10), step) for step in range(10)} == {1.0}  # the default: constant
    state = new_state(ModelParams(**SMALL_MODEL), decaying, CPU, 10)
    state.step, state.watch = 8, Watch(remedies=["halve_lr_d"])  # D's rate as a rescue left it, decayed too
    decay_learning_rates(state, decaying)
    assert state.opt_g.param_groups[0]["lr"] == pytest.approx(decaying.lr_g * 0.4)
    assert state.opt_d.param_groups[0]["lr"] == pytest.approx(decaying.lr_d * 0.5 * 0.4)


def test_a_decaying_run_steps_with_the_schedule_and_resumes_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rates: list[float] = []  # G's and D's at each step of the uninterrupted run
    step = loop.train_step

    def recording(state, *args, **kwargs):  # type: ignore[no-untyped-def]
        rates.extend([state.opt_g.param_groups[0]["lr"], state.opt_d.param_groups[0]["lr"]])
        return step(state, *args, **kwargs)

    saved = tmp_path / "ckpt.pt"
    at_three = Callbacks(on_checkpoint=lambda s: s.step == 3 and files.save_checkpoint(s.to_checkpoint("fp"), saved))
    monkeypatch.setattr(loop, "train_step", recording)
    whole = train_tiny(6, callbacks=at_three, lr_decay_from=0.25)  # the checkpoint at step 3, mid-decay
    monkeypatch.setattr(loop, "train_step", step)
    lr = TrainParams().lr_g
    assert rates == pytest.approx([lr * share for share in (1, 1, 8 / 9, 6 / 9, 4 / 9, 2 / 9) for _ in "GD"])
    resumed = new_state(ModelParams(**SMALL_MODEL), TrainParams(**{**TINY_TRAIN, "lr_decay_from": 0.25}), CPU, 10)
    torch.manual_seed(12345)
    resumed.restore(files.load_checkpoint(saved))
    again = train_tiny(6, state=resumed, lr_decay_from=0.25)
    wa, wb = everything(again), everything(whole)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert again.history == whole.history
    assert any(not torch.equal(wb[k], v) for k, v in everything(train_tiny(6)).items())  # the decay changed the run


def test_a_decayed_run_is_fingerprinted_with_its_steps() -> None:
    def mark(**train: object) -> str:
        return checkpoint_fingerprint(Params(train=TrainParams(**train)), "data", "fp32")

    assert mark(steps=100) == mark(steps=200)  # constant rates: a finished run may be extended
    assert mark(steps=100, lr_decay_from=0.5) != mark(steps=200, lr_decay_from=0.5)  # another schedule
    assert mark(steps=100, lr_decay_from=0.5) != mark(steps=100)


def test_a_param_added_later_is_left_out_of_the_fingerprints_when_off() -> None:
    """Checkpoints and sweep studies made before `train.standing_stats` existed (9e98a50) still match.
    A new param that changes these hashes needs `Added(off=...)` (sections.py): without it every
    checkpoint and study of earlier versions stops matching."""
    assert checkpoint_fingerprint(Params(), "data", "fp32") == "266ad1a4bd75d0c4"
    decayed = Params(train=TrainParams(lr_decay_from=0.5, ema_decay=0.9995))
    assert checkpoint_fingerprint(decayed, "data", "bf16") == "50b797b5972aea62"
    assert optuna_study.fingerprint(Params(), "d", "c") == "58a02d66f09e8a88"
    standing = Params(train=TrainParams(standing_stats=4))
    assert checkpoint_fingerprint(standing, "data", "fp32") != "266ad1a4bd75d0c4"  # on, it is another run
    assert optuna_study.fingerprint(standing, "d", "c") != "58a02d66f09e8a88"


# --- standing statistics (gan/sampling.py) ------------------------------------------------------


def batch_norm_inputs(generator: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list:
    """Each batch norm's input in each batch, G run in training mode (each batch norm on its batch's statistics)."""
    seen: dict[torch.nn.Module, list[torch.Tensor]] = {}
    norms = [m for m in generator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.setdefault(m, []).append(inp[0].double())) for m in norms]
    generator.train()
    with torch.no_grad():
        for z, y in batches:
            generator(z, y)
    for hook in hooks:
        hook.remove()
    return [seen[m] for m in norms]


@pytest.mark.parametrize("model", [{}, {"conditional": True}, {"arch": "resnet", "conditional": True}],
                         ids=["dcgan", "conditional", "resnet"])  # fmt: skip
def test_standing_stats_are_the_batch_statistics_of_the_generator_s_own_samples(model: dict) -> None:
    from copy import deepcopy

    from pipeline.gan.architectures import build_generator
    from pipeline.gan.sampling import STANDING_BATCH, with_standing_stats

    torch.manual_seed(0)
    generator = build_generator(ModelParams(**{**SMALL_MODEL, **model}), n_classes=10).eval()
    for norm in (m for m in generator.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_mean.fill_(5.0)  # statistics as a long EMA could leave them, far from G's own
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    standing = with_standing_stats(generator, 3, seed=7)

    rng = torch.Generator().manual_seed(7)
    labels = torch.arange(STANDING_BATCH) % 10 if generator.n_classes else None
    batches = [(torch.randn(STANDING_BATCH, generator.latent_dim, generator=rng), labels) for _ in range(3)]
    by_hand = batch_norm_inputs(deepcopy(generator), batches)
    norms = [m for m in standing.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and len(norms) == len(by_hand)
    for norm, inputs in zip(norms, by_hand, strict=True):
        mean = torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0)  # the batches' average
        var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs]).mean(0)
        assert torch.allclose(norm.running_mean.double(), mean, atol=1e-5)
        assert torch.allclose(norm.running_var.double(), var, rtol=1e-4, atol=1e-6)
    assert not standing.training and all(torch.equal(v, before[k]) for k, v in generator.state_dict().items())
    again = with_standing_stats(generator, 3, seed=7).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in standing.state_dict().items())  # seeded: the same again
    synced = with_standing_stats(torch.nn.SyncBatchNorm.convert_sync_batchnorm(deepcopy(generator)), 3, seed=7)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())  # a job's G: plain batch norm
    assert all(torch.equal(v, again[k]) for k, v in synced.state_dict().items())


def test_a_run_with_standing_stats_gives_its_ema_with_batch_norm_from_its_own_samples() -> None:
    state = train_tiny(4, ema_decay=0.9, standing_stats=2)
    given, ema_g = state.given(), state.ema.module
    assert given is state.given() and given is not ema_g and state.output is ema_g  # made once a step
    ema_weights, given_weights = ema_g.state_dict(), given.state_dict()
    for key, value in ema_weights.items():
        if "num_batches" not in key:  # only the statistics differ
            assert torch.equal(value, given_weights[key]) == ("running_" not in key), key
    state = train_tiny(5, state=state, ema_decay=0.9, standing_stats=2)
    assert state.given() is not given  # a step later, made again
    plain = train_tiny(2, ema_decay=0.9)
    assert plain.given() is plain.ema.module  # off: the EMA itself, as before


def test_a_run_with_standing_stats_resumes_bit_identically(tmp_path: Path) -> None:
    lever = {"ema_decay": 0.9, "standing_stats": 2}
    first = train_tiny(3, **lever)
    first.given()  # made at step 3: the checkpoint holds the statistics as trained, not these
    files.save_checkpoint(first.to_checkpoint("fp"), tmp_path / "ckpt.pt")
    resumed = new_state(ModelParams(**SMALL_MODEL), TrainParams(**{**TINY_TRAIN, **lever, "steps": 3}), CPU, 10)
    resumed.restore(files.load_checkpoint(tmp_path / "ckpt.pt"))
    a, b = train_tiny(6, state=resumed, **lever), train_tiny(6, **lever)
    for x, y in ((everything(a), everything(b)), (a.given().state_dict(), b.given().state_dict())):
        assert all(torch.equal(x[k], y[k]) for k in x)
