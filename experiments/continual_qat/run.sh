#!/usr/bin/env bash
# The continual-QAT study at CPU scale (experiments/continual_qat/README.md): 9 runs of ~5 minutes on 2 CPU cores.
#   bash experiments/continual_qat/run.sh            # runs into multirun/continual_qat/{when,how}, then reports
set -euo pipefail
OUT=${OUT:-multirun/continual_qat}
COMMON=(model.d_model=96 model.n_layers=2 model.n_heads=4 model.d_ff=256 model.max_seq_len=128
        data.seq_len=128 data.batch_size=8 data.val_windows=32
        trainer.max_steps=300 trainer.val_check_interval=50 trainer.precision=32-true trainer.enable_progress_bar=false
        +callbacks.lm_eval._target_=bitflow.eval.LMEvalCallback +callbacks.lm_eval.every_n_steps=300
        +callbacks.lm_eval.limit=200)
# when to switch: never (16-bit), from the start (1.58-bit), at 20%, 50%, 80%; optimizer state kept, no phase-in
bitflow -m quant=ternary transition=default transition.at=null,0,0.2,0.5,0.8 "${COMMON[@]}" hydra.sweep.dir="$OUT/when"
# how to switch at 50%: optimizer state keep/reset x phase-in none/tanh (conf/experiment/transition_50pct.yaml)
bitflow -m +experiment=transition_50pct "${COMMON[@]}" hydra.sweep.dir="$OUT/how"
bitflow-report "$OUT/when" "$OUT/how" --out "$(dirname "$0")"
