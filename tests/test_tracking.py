"""The tracking boundary's bookkeeping: what MLflow did not receive is data, summed up in one sentence."""

from __future__ import annotations

from pipeline.tracking import Lost, summarise_lost


def test_lost_items_sum_up_by_kind_and_step_span() -> None:
    lost = [
        Lost("metrics", steps=(13, 14)),
        Lost("image", "samples", (16,)),
        Lost("metrics", steps=(15, 40)),
        Lost("image", "samples", (20,)),
        Lost("artifact", "train_log.csv"),
        Lost("model", "generator"),
        Lost("run status"),
        Lost("run status"),
    ]
    assert summarise_lost(lost, "connection refused") == (
        "MLflow did not receive metrics of steps 13-40, 2 images 'samples' of steps 16-20, artifact train_log.csv, "
        "model 'generator', run status (connection refused)"
    )
    assert str(lost[1]) == "image 'samples' at step 16" and str(lost[0]) == "metrics of steps 13-14"
    assert summarise_lost([], None) == ""
