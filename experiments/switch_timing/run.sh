#!/usr/bin/env bash
# When to switch, decided by the run (experiments/switch_timing/README.md): at=auto against fixed 20/50/80% and the
# 16-bit and ternary baselines, 3 seeds each, plus a progressive (block-wise) switch against all-at-once at the same
# mean step. 33 runs of ~1.5 minutes on 2 CPU cores (the continual_qat budget: 1M parameters, 300 steps).
#   bash experiments/switch_timing/run.sh          # runs into multirun/switch_timing/..., then the report
set -euo pipefail
OUT=${OUT:-multirun/switch_timing}
COMMON=(quant=ternary transition=default seed=1234,1235,1236
        model.d_model=96 model.n_layers=2 model.n_heads=4 model.d_ff=256 model.max_seq_len=128
        data.seq_len=128 data.batch_size=8 data.val_windows=32
        trainer.max_steps=300 trainer.val_check_interval=50 trainer.precision=32-true trainer.enable_progress_bar=false
        transition.gap_every=10 transition.gap_windows=8)
# when: never (16-bit, the gap measured all along), from the start, 20/50/80%, and auto (the plateau rule: the gap
# smoothed over 3 measurements has not fallen for 3 measurements; between 10% and 90%)
bitflow -m "${COMMON[@]}" transition.at=null,0,0.2,0.5,0.8,auto hydra.sweep.dir="$OUT/when"
# fixed early switches, at 10% and 15% (steps 30 and 45: around the minimum of the gap)
bitflow -m "${COMMON[@]}" transition.at=0.1,0.15 hydra.sweep.dir="$OUT/early"
# auto with the threshold rule: switch once the smoothed gap reaches 0.1 nats
bitflow -m "${COMMON[@]}" transition.at=auto transition.auto_rule=threshold transition.auto_threshold=0.1 \
  hydra.sweep.dir="$OUT/threshold"
# auto, plateau rule reacting at the first rise of the gap (smoothing 1, patience 1)
bitflow -m "${COMMON[@]}" transition.at=auto transition.auto_smoothing=1 transition.auto_patience=1 \
  hydra.sweep.dir="$OUT/auto_fast"
# progressive: block by block (least fragile first), the first at step 120 and the second at 180 (mean 150 = 50%)
bitflow -m "${COMMON[@]}" transition.at=120 transition.schedule=progressive transition.progressive_steps=60 \
  transition.progressive_order=sensitivity hydra.sweep.dir="$OUT/progressive"
bitflow-report "$OUT" --out "$(dirname "$0")"
python "$(dirname "$0")/plots.py" "$OUT" --out "$(dirname "$0")"
