#!/usr/bin/env bash
# Spectra at CPU scale (experiments/spectra/README.md): FloatLM and TriLM at 4 sizes (8 training runs of 300
# steps x 8 x 128 tokens), QuantLM = GPTQ of each FloatLM's last checkpoint at 3, 4, 6, 8 bits, then the table of
# loss against size in bits, the headline plot and the training report (with its size_mbit column).
#   bash experiments/spectra/run.sh            # runs into $RUNS (default /tmp/bitflow_studies), results here
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export RUNS=${RUNS:-/tmp/bitflow_studies} OMP_NUM_THREADS=1
[ -f "$RUNS/trilm/tiny/checkpoints/step000300.ckpt" ] || bash "$HERE/train.sh"
nice -n 10 python "$HERE/plot.py" "$RUNS" "$HERE"
bitflow-report "$RUNS/floatlm" "$RUNS/trilm" --out "$HERE"
