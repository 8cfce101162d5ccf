#!/usr/bin/env bash
# The QiD scaling study (experiments/qid_scaling/README.md): the FloatLM runs of experiments/spectra (4 sizes, a
# checkpoint every 50 of 300 steps, 6 each) x GPTQ and RTN x 2, 3, 4, 8 bits = 192 points, then the fit of
# QiD = k D^beta / (N^alpha P^gamma) and the plots.
#   bash experiments/qid_scaling/run.sh        # runs into $RUNS (default /tmp/bitflow_studies), results here
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export RUNS=${RUNS:-/tmp/bitflow_studies} OMP_NUM_THREADS=1
[ -f "$RUNS/floatlm/tiny/checkpoints/step000300.ckpt" ] || bash "$HERE/../spectra/train.sh"
nice -n 10 bitflow-qid "$RUNS/floatlm" --methods gptq,rtn --bits 2,3,4,8 --calib-windows 32 \
  --cache "$RUNS/qid_cache" --out "$HERE"
