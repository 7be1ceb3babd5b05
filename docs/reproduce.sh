#!/usr/bin/env bash
# The reproduction study of docs/reproduction.md: modular addition and
# subtraction (p = 97), weight decay 1.0 and 0.0, seeds 0, 1, 2.
# Run from an empty folder with spectral-analyzer installed; two trainings at a
# time on two cores take about 25 minutes.
set -euo pipefail
jobs=()
for op in add sub; do for wd in 1.0 0.0; do for seed in 0 1 2; do jobs+=("$op $wd $seed"); done; done; done
train() {
  read -r op wd seed <<< "$1"
  OMP_NUM_THREADS=1 spectral-analyze train-example "runs/$op-wd$wd-s$seed" --operation "$op" \
    --weight-decay "$wd" --seed "$seed" --steps 4000 --every 100 --no-progress
}
export -f train
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} bash -c 'train "{}"'
mkdir -p stores
for run in runs/*; do
  spectral-analyze ingest "$run" -o "stores/$(basename "$run").zarr" --no-progress
done
spectral-analyze grokking stores/*.zarr --window 10 -o grokking.csv
python "$(dirname "$0")/reproduce_table.py" stores/*.zarr
