#!/usr/bin/env bash
# "When are 1.58 bits enough?" at CPU scale (README.md here), on a 2-core CPU shared with six other jobs
# (single-threaded, nice): the four families of conf/experiment/when158_*.yaml, shrunk.
#   MLP: hidden 256 (the paper: 1024), 150 steps; 16-bit / absmean / absmedian x 3 seeds            (9 runs)
#   GNN: SGC (K=2) and GCN, 150 full-graph steps; 16-bit / absmean / absmedian x 3 seeds          (18 runs)
#   encoder (MLM), encoder-decoder (span corruption): a 200-file stdlib subset with a 512-token BPE, 120 steps
#     of 16 x 64 tokens; hidden x1 = 32: 16-bit / absmean / absmedian x 3 seeds; x2 = 64 and x4 = 128:
#     16-bit / absmean x 2 seeds                                                                   (17 runs each)
#   bash experiments/when_158_enough/run.sh      # runs into multirun/when_158_enough/<family>, then tables.py
set -euo pipefail
OUT=${OUT:-multirun/when_158_enough}
HERE=$(dirname "$0")
export OMP_NUM_THREADS=1
BF=(nice -n 10 python -m bitflow.cli)  # = `bitflow`, with this checkout's code
COMMON=(trainer.precision=32-true trainer.enable_progress_bar=false)
LM=(data.source.max_files=200 data.vocab_size=512 trainer.max_steps=120 trainer.val_check_interval=60
    data.val_windows=16 "${COMMON[@]}")
[ -n "${SKIP_MLP:-}" ] || "${BF[@]}" -m +experiment=when158_mlp model.d_hidden=256 trainer.max_steps=150 "${COMMON[@]}" hydra.sweep.dir="$OUT/mlp"
"${BF[@]}" -m +experiment=when158_gnn trainer.max_steps=150 "${COMMON[@]}" hydra.sweep.dir="$OUT/gnn"
for family in encoder encdec; do
  "${BF[@]}" -m +experiment=when158_$family "${LM[@]}" model.d_model=32 seed=1,2,3 hydra.sweep.dir="$OUT/$family/x1"
  "${BF[@]}" -m +experiment=when158_$family "${LM[@]}" model.d_model=64,128 quant=none,ternary seed=1,2 \
    hydra.sweep.dir="$OUT/$family/x2x4"
done
python "$HERE/tables.py" "$OUT" --out "$HERE"
