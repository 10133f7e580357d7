#!/usr/bin/env bash
# Wall time of the demo study (experiments/shapes_5phase.toml: finetune, modx, joint; seeds 0 and 1)
# three ways: the sequential runner; --executor ray with one job at a time (each job holds every CPU);
# --executor ray with two jobs at once (--cpus-per-run 1). The Ray times include starting and
# stopping a local Ray. Run it on an otherwise idle machine; it prints the times and their ratios.
#
#   scripts/bench_ray_demo.sh                       # the demo's budget (about 3 x 7 min on 2 cores)
#   scripts/bench_ray_demo.sh train.steps=15 train.base_steps=40   # a quick check that it works
#
# Extra arguments are config overrides given to every run. PY (default .venv/bin/python) and OUT
# (default runs/bench_ray, emptied first) can be set in the environment.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/bench_ray}
CPUS=$(nproc)
rm -rf "$OUT"
mkdir -p "$OUT"

# seconds taken by one study into $OUT/$1 (its output in $OUT/$1.log)
study() {
    local name=$1
    shift
    local start end
    start=$(date +%s.%N)
    if ! "$PY" -m geomlab.train --out "$OUT/$name" --seeds 0,1 --strategies finetune,modx,joint "$@" \
            >"$OUT/$name.log" 2>&1; then
        echo "bench_ray_demo: the $name study failed; see $OUT/$name.log" >&2
        exit 1
    fi
    end=$(date +%s.%N)
    "$PY" -c "print($end - $start)"
}

sequential=$(study sequential "$@")
one=$(study ray_one_at_a_time --executor ray --cpus-per-run "$CPUS" "$@")
two=$(study ray_two_at_once --executor ray --cpus-per-run 1 "$@")

# the three studies must have trained the same thing: compare their final checkpoints
"$PY" - "$OUT" <<'PY'
import sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
for seed in (0, 1):
    for s in ("finetune", "modx", "joint"):
        last = sorted((out / "sequential" / f"seed{seed}" / s / "checkpoints").glob("*.pt"))[-1].name
        a = torch.load(out / "sequential" / f"seed{seed}" / s / "checkpoints" / last, weights_only=True)["state_dict"]
        for other in ("ray_one_at_a_time", "ray_two_at_once"):
            b = torch.load(out / other / f"seed{seed}" / s / "checkpoints" / last, weights_only=True)["state_dict"]
            d = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
            if d > 1e-4:
                print(f"note: {other} seed{seed}/{s} differs from the sequential run by {d:.2g} (thread counts differ)")
PY

"$PY" - "$CPUS" "$sequential" "$one" "$two" <<'PY'
import sys
cpus, seq, one, two = sys.argv[1], *map(float, sys.argv[2:])
print(f"{'demo study, seeds 0,1 (' + cpus + ' CPUs)':34s} {'wall (s)':>9s} {'ratio':>7s}")
for name, t in (("sequential", seq), ("ray, one job at a time", one), ("ray, two jobs at once", two)):
    print(f"{name:34s} {t:9.1f} {t / seq:7.2f}")
print(f"two jobs at once / one at a time: {two / one:.2f}")
PY
