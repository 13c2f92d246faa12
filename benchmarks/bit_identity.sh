#!/usr/bin/env bash
# Bit-identity of a refactor: the default params and the quality preset (model.conditional +
# train.ema_decay 0.995), 300 training steps each, prepare + reference + train + evaluate on the
# CPU, in a baseline tree and in this one; then the weights, the per-step log and eval.json compared.
#
#   git worktree add /tmp/base 25fe86c
#   MNIST_MIRROR=../shared/data/mnist benchmarks/bit_identity.sh /tmp/base . /tmp/bit-identity
#
# Prints, per arm, whether the weights, metrics/train_log.csv and eval.json (every key of the
# base's but its timing; keys the new tree adds are listed) are identical, and BIT-IDENTICAL or
# DIFFERENT; exits 1 when different. About 5 minutes per tree on 2 cores. Each tree runs its own
# code (PYTHONPATH) in a copy of its tracked files.
set -euo pipefail
base=$(realpath "$1"); new=$(realpath "$2"); out=$(realpath -m "${3:-/tmp/bit-identity}")
py=${PYTHON:-python}
run_tree() {  # tree, folder
  local tree=$1 dir=$2
  rm -rf "$dir"; mkdir -p "$dir"
  for arm in default preset; do
    mkdir -p "$dir/$arm"
    (cd "$tree" && git ls-files -z | grep -zv '^tests/\|^benchmarks/' | xargs -0 -I{} cp --parents {} "$dir/$arm/")
    (cd "$dir/$arm" && "$py" - "$arm" <<'PY'
import sys, yaml
p = yaml.safe_load(open("params.yaml"))
p["train"]["steps"] = 300
if sys.argv[1] == "preset":
    p["model"]["conditional"] = True
    p["train"]["ema_decay"] = 0.995
yaml.safe_dump(p, open("params.yaml", "w"))
PY
    )
    for stage in prepare reference train evaluate; do
      (cd "$dir/$arm" && PYTHONPATH="$tree" MLFLOW_TRACKING_URI="sqlite:///$dir/mlflow.db" \
        "$py" -m pipeline "$stage" > "$stage.log" 2>&1) || { echo "$tree: $arm $stage failed"; tail -5 "$dir/$arm/$stage.log"; exit 1; }
    done
  done
}
run_tree "$base" "$out/base"
run_tree "$new" "$out/new"
"$py" - "$out/base" "$out/new" <<'PY'
import io, json, sys
from pathlib import Path

import torch

a, b = Path(sys.argv[1]), Path(sys.argv[2])


def weights(path: Path) -> dict:
    blob = path.read_bytes()
    return torch.load(io.BytesIO(blob[: -(len(b"\nDCGAN-SHA256:") + 64)]), weights_only=True)  # the checksum trailer


same = True
for arm in ("default", "preset"):
    wa, wb = (weights(x / arm / "models/generator.pt") for x in (a, b))
    same_w = wa.keys() == wb.keys() and all(wa[k].keys() == wb[k].keys() and all(torch.equal(wa[k][n], wb[k][n]) for n in wa[k]) for k in wa)
    same_log = (a / arm / "metrics/train_log.csv").read_bytes() == (b / arm / "metrics/train_log.csv").read_bytes()
    ea, eb = ({k: v for k, v in json.loads((x / arm / "metrics/eval.json").read_text()).items() if k != "seconds"} for x in (a, b))
    differ = sorted(k for k in ea if ea[k] != eb.get(k))  # every figure of the base; the new tree may add scores
    added = sorted(eb.keys() - ea.keys())
    print(f"{arm}: weights identical {same_w}, train_log identical {same_log}, eval.json differs in {differ or 'nothing'}"
          f"{f' (new keys {added})' if added else ''}, FID {ea['fid']} / {eb['fid']}")
    same &= same_w and same_log and not differ
print("BIT-IDENTICAL" if same else "DIFFERENT")
sys.exit(0 if same else 1)
PY
