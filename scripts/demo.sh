#!/usr/bin/env bash
# The main job on embedded defaults: train a small model on CPU with 2 ranks (torchrun, gloo),
# logging through MLflow, TensorBoard and W&B loggers into mllogs/ (no network), then look at
# the journal and replay it into an embedded MLflow store and TensorBoard event files.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SAVEDIR=${SAVEDIR:-mllogs}
export ITWINAI_RUN_ID=${ITWINAI_RUN_ID:-demo-$(date +%Y%m%d-%H%M%S)}
echo "== training (2 ranks, CPU) -> $SAVEDIR/"
.venv/bin/torchrun --standalone --nproc_per_node=2 scripts/train_example.py \
    --savedir "$SAVEDIR" --epochs 3
echo; echo "== itwinai-sync ls $SAVEDIR"
.venv/bin/itwinai-sync ls "$SAVEDIR"
echo; echo "== itwinai-sync verify $SAVEDIR"
.venv/bin/itwinai-sync verify "$SAVEDIR"
echo; echo "== itwinai-sync $SAVEDIR --to mlflow --to tensorboard"
.venv/bin/itwinai-sync "$SAVEDIR" --to mlflow --to tensorboard --run "$ITWINAI_RUN_ID"
echo; echo "== itwinai-sync show $SAVEDIR $ITWINAI_RUN_ID"
.venv/bin/itwinai-sync show "$SAVEDIR" "$ITWINAI_RUN_ID"
echo
echo "Open the results:"
echo "  .venv/bin/mlflow ui --backend-store-uri sqlite:///$(cd "$SAVEDIR" && pwd)/mlflow.db"
echo "  .venv/bin/tensorboard --logdir $SAVEDIR/tensorboard"
