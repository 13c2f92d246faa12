"""The speed levers chosen per machine (gan/levers.py, lever_cache.py): either form of each lever is the
same function; `auto` is timed once, cached, and read back; a damaged cache is ignored with one line."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from pipeline import data, files
from pipeline.gan import levers
from pipeline.gan.loop import train_step
from pipeline.gan.losses import LOSSES
from pipeline.gan.state import new_state
from pipeline.params import ModelParams, Params, TrainParams
from pipeline.tracking.memory import MemoryStore
from tests.conftest import CPU, SMALL_MODEL, TINY_TRAIN, make_project


def small(**train: object) -> Params:
    return Params(model=ModelParams(**SMALL_MODEL), train=TrainParams(**{**TINY_TRAIN, **train}))


@pytest.mark.parametrize("lever", levers.AUTO_LEVERS)
def test_every_form_of_a_lever_is_the_same_function_to_1e_5_in_fp32(lever: str) -> None:
    """G's samples, D's logits, every gradient of G's and D's losses, and a training step's losses."""
    generator = torch.Generator().manual_seed(0)
    real = data.to_model(torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8, generator=generator))
    z = torch.randn(8, 100, generator=generator)
    found = {}
    for form in levers.FORMS[lever]:
        params = small(precision="fp32", **{lever: form})
        state = new_state(params.model, params.train, CPU, 10)  # the same seed: the same initial weights
        G, D, bce = state.generator, state.discriminator, LOSSES["bce"]
        torch.manual_seed(1)  # the same dropout masks
        fake = G(z)
        (bce.d_real(D(real)) + bce.g(D(fake))).backward()
        grads = {name: w.grad for name, w in [*G.named_parameters(), *D.named_parameters()]}
        torch.manual_seed(1)
        stats = train_step(state, real, z, contextlib.nullcontext(), bce)
        found[form] = (fake.detach(), grads, stats)
    (fake, grads, stats), *others = found.values()
    for fake2, grads2, stats2 in others:
        torch.testing.assert_close(fake, fake2, rtol=0, atol=1e-5)
        torch.testing.assert_close(stats, stats2, rtol=0, atol=1e-5)
        assert grads.keys() == grads2.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], grads2[name], rtol=0, atol=1e-5, msg=name)


def test_auto_times_every_combination_of_the_forms() -> None:
    forms = levers.forms(small(fast_upsample="auto", channels_last="auto"))
    assert len(forms) == 6 and {form["fast_upsample"] for form in forms} == {True, False, "taps"}
    assert levers.forms(small(channels_last="auto")) == [{"channels_last": True}, {"channels_last": False}]


def test_auto_is_timed_once_then_read_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache/levers.json"
    monkeypatch.setenv("PIPELINE_LEVER_CACHE", str(cache))
    timed: list[dict[str, object]] = []
    rate = levers.images_per_second
    monkeypatch.setattr(levers, "images_per_second", lambda p, d, n, *_: timed.append(p.train.model_dump()) or rate(p, d, n, *_))
    params = small(channels_last="auto", fast_output="auto")
    resolved, said = levers.choose(params, CPU, 10)
    assert len(timed) == 4 * levers.ROUNDS and cache.is_file()  # the four forms, taking turns, once
    assert timed[4:8] == timed[:4]  # in turns, not one form's rounds in a row
    (entry,) = json.loads(cache.read_text()).values()
    best = json.loads(max(entry["img_s"], key=entry["img_s"].get))
    assert {k: getattr(resolved.train, k) for k in best} == best and resolved.train.fast_upsample is True
    assert said is not None and said.startswith("speed levers ") and f"timed here, kept in {cache}" in said
    again, said_again = levers.choose(params, CPU, 10)
    assert len(timed) == 4 * levers.ROUNDS and again == resolved and f"from {cache}" in str(said_again)  # read
    # The cache decides: rates written there are what the choice follows.
    key = levers.cache_key(params, CPU)
    slowest = min(entry["img_s"], key=entry["img_s"].get)
    files.write_json(cache, {key: {"img_s": {form: 2.0 if form == slowest else 1.0 for form in entry["img_s"]}}})
    chosen, _ = levers.choose(params, CPU, 10)
    assert {k: getattr(chosen.train, k) for k in best} == json.loads(slowest) and len(timed) == 4 * levers.ROUNDS
    assert levers.choose(small(), CPU, 10) == (small(), None)  # nothing auto: nothing timed or said


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", '{"x": 1}'])
def test_a_damaged_cache_is_ignored_with_one_line_and_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    cache = tmp_path / "levers.json"
    cache.write_text(damage)
    monkeypatch.setenv("PIPELINE_LEVER_CACHE", str(cache))
    monkeypatch.setattr(levers, "images_per_second", lambda p, d, n, *_: 100.0 + p.train.channels_last)
    resolved, said = levers.choose(small(channels_last="auto"), CPU, 10)
    assert resolved.train.channels_last is True
    if damage == '{"x": 1}':  # a readable cache without this machine's entry: timed and added, no warning
        assert said is not None and not said.startswith("warning") and set(json.loads(cache.read_text())) >= {"x"}
    else:
        assert said is not None and said.startswith(f"warning: ignoring the lever cache {cache} (")
        assert "\n" not in said and json.loads(cache.read_text())  # one line; the cache written whole again


def test_a_lever_left_auto_cannot_build_a_model() -> None:
    with pytest.raises(ValueError, match="choose its form first"):
        new_state(ModelParams(**SMALL_MODEL), TrainParams(channels_last="auto"), CPU, 10)


def test_the_train_stage_trains_with_the_forms_it_chose_and_records_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory_store: MemoryStore
) -> None:
    from pipeline.stages import train

    monkeypatch.setenv("PIPELINE_LEVER_CACHE", str(tmp_path / "levers.json"))
    monkeypatch.setattr(levers, "images_per_second", lambda p, d, n, *_: 100.0 + p.train.channels_last)
    project = make_project(tmp_path / "p", steps=2, channels_last="auto")
    monkeypatch.chdir(project)
    train.main(project / "params.yaml")
    run_id = files.read_json(project / "models/train_run.json")["run_id"]
    run = memory_store.runs[run_id]
    assert run.tags["levers"].startswith("speed levers channels_last=true (timed here")
    assert run.params["train.channels_last"] == "True"  # the form the numbers came from
