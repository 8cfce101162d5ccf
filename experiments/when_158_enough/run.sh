#!/usr/bin/env bash
# "When are 1.58 bits enough?" at CPU scale (README.md here), on a 2-core CPU shared with six other jobs
# (single-threaded, nice): the four families of conf/experiment/when158_*.yaml, shrunk.
#   MLP: hidden 256 (the paper: 1024), 150 steps; 16-bit / absmean / absmedian x 3 seeds                  (9 runs)
#        and 600 steps, seed 1 (mlp_long)                                                                 (3 runs)
#   SGC (K=2): 150 full-graph steps; 16-bit / absmean / absmedian x 3 seeds                               (9 runs)
#   GCN: 100 full-graph steps; 16-bit / absmean / absmedian x 3 seeds                                     (9 runs)
#   encoder (MLM), encoder-decoder (span corruption): a 200-file stdlib subset with a 512-token BPE, 200 steps of
#     16 x 64 tokens; hidden x1 = 32: 16-bit / absmean / absmedian; x2 = 64 and x4 = 128: 16-bit / absmean;
#     2 seeds                                                                                       (14 runs each)
#   bash experiments/when_158_enough/run.sh      # runs into multirun/when_158_enough/<family>, then tables.py
# PARTS="mlp mlp_long sgc gcn encoder encdec" (the default) picks what to run.
set -euo pipefail
OUT=${OUT:-multirun/when_158_enough}
HERE=${HERE:-$(dirname "$0")}
export OMP_NUM_THREADS=1
BF=(nice -n 10 python -m bitflow.cli)  # = `bitflow`, with this checkout's code
COMMON=(trainer.precision=32-true trainer.enable_progress_bar=false)
LM=(data.source.max_files=200 data.vocab_size=512 trainer.max_steps=200 trainer.val_check_interval=100
    data.val_windows=16 seed=1,2 "${COMMON[@]}")
for part in ${PARTS:-mlp mlp_long sgc gcn encoder encdec}; do
  case $part in
    mlp) "${BF[@]}" -m +experiment=when158_mlp model.d_hidden=256 trainer.max_steps=150 "${COMMON[@]}" \
           hydra.sweep.dir="$OUT/mlp" ;;
    mlp_long) "${BF[@]}" -m +experiment=when158_mlp model.d_hidden=256 trainer.max_steps=600 trainer.val_check_interval=150 \
           seed=1 "${COMMON[@]}" hydra.sweep.dir="$OUT/mlp_long" ;;
    sgc) "${BF[@]}" -m +experiment=when158_gnn model=sgc trainer.max_steps=150 "${COMMON[@]}" hydra.sweep.dir="$OUT/sgc" ;;
    gcn) "${BF[@]}" -m +experiment=when158_gnn model=gcn trainer.max_steps=100 trainer.val_check_interval=50 \
           "${COMMON[@]}" hydra.sweep.dir="$OUT/gcn" ;;
    encoder|encdec)
      "${BF[@]}" -m +experiment=when158_$part "${LM[@]}" model.d_model=32 hydra.sweep.dir="$OUT/$part/x1"
      "${BF[@]}" -m +experiment=when158_$part "${LM[@]}" model.d_model=64,128 quant=none,ternary \
        hydra.sweep.dir="$OUT/$part/x2x4" ;;
  esac
done
python "$HERE/tables.py" "$OUT" --out "$HERE"
