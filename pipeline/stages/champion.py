"""Command `champion`: print the registry's champion generator of the configured dataset."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.tracking.registry import champion, model_name


def main(params_path: Path = Path("params.yaml")) -> None:
    """`python -m pipeline champion`: the best generator so far, with its scores and run."""
    from pipeline.params import load_params
    from pipeline.tracking import connection

    params = load_params(params_path)
    uri, _, _ = connection.open_experiment(params.tracking.experiment, Path.cwd(), dict(os.environ))
    found = champion(model_name(params.tracking.experiment, params.data.dataset))
    floor = f" (real-data floor {float(found['fid_floor']):.4g})" if found.get("fid_floor") else ""
    print(f"champion: {found['model']} version {found['version']} -> {found['uri']}")
    interval = (
        f", 95% interval [{float(found['fid_low']):.4f}, {float(found['fid_high']):.4f}]"
        if found.get("fid_low")
        else ""
    )
    print(
        f"  FID {float(found['fid']):.4f}{interval}{floor} at N={found['n_samples']}, "
        f"classifier {found['classifier_sha256'][:12]}"
    )
    print("  the alias moves only to a version whose interval lies wholly below this one's")
    print(f"  from training run {found['run_name'] or '?'} ({found['run_id']}) in {connection.redact(uri)}")
    print(f"  draw from it: python -m pipeline generate --model {found['uri']}")
