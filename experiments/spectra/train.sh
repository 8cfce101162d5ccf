#!/usr/bin/env bash
# Trains the FloatLM and TriLM families of experiments/spectra: 4 sizes each (conf/model/micro_{s,m,l}.yaml, tiny),
# 300 steps of 8 x 128 tokens (307k tokens), a checkpoint every 50 steps, all kept. The FloatLM runs double as the
# runs of experiments/qid_scaling. The eight runs go in parallel (one process each, single-threaded, nice).
#   bash experiments/spectra/train.sh            # into $RUNS/{floatlm,trilm}/<size> (default /tmp/bitflow_studies)
set -euo pipefail
RUNS=${RUNS:-/tmp/bitflow_studies}
export OMP_NUM_THREADS=1
COMMON=(data.seq_len=128 data.batch_size=8 data.val_windows=32
        trainer.max_steps=300 trainer.val_check_interval=100 trainer.precision=32-true trainer.enable_progress_bar=false
        callbacks.model_checkpoint.every_n_train_steps=50)
for family in floatlm trilm; do
  for size in micro_s micro_m micro_l tiny; do
    nice -n 10 bitflow "+experiment=[qid_checkpoints,spectra_$family]" model=$size "${COMMON[@]}" \
      hydra.run.dir="$RUNS/$family/$size" > "$RUNS/$family-$size.log" 2>&1 &
  done
done
wait
