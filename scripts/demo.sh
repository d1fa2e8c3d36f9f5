#!/usr/bin/env bash
# The main job on one machine: start the embedded S3 server, build the tiny model, deliver model and
# data into the bucket, fine-tune with LoRA through the same train job a pod runs (checkpoints
# uploaded as they are saved), pull the merged model and chat with it. State: $FINETUNE_DEMO_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DISABLE_MLFLOW_INTEGRATION=${DISABLE_MLFLOW_INTEGRATION:-TRUE}
DEMO=${FINETUNE_DEMO_DIR:-.work}
PY=.venv/bin/python
ENGINE=.venv/bin/finetune-engine
mkdir -p "$DEMO"
$ENGINE local-s3 start --dir "$DEMO/s3"
set -a; . "$DEMO/s3/s3.env"; set +a
B="s3://$FINETUNE_BUCKET"
[[ -f $DEMO/tiny-model/config.json ]] || $PY -m finetune_engine.tiny model "$DEMO/tiny-model" >/dev/null
$ENGINE deliver-model "$DEMO/tiny-model" "$B/models/local/tiny-model"
FINETUNE_DATA_SCRIPT=$(cat examples/tiny_data_script.py) $ENGINE deliver-data "$B/datasets/"
$ENGINE train-job --config engine/configs/tiny-sft-lora.yaml \
  --set "run_conf.model=$B/models/local/tiny-model" \
  --set "data_conf.training_data.datasets[0].path=$B/datasets/tiny-chat.jsonl" \
  --checkpoint-uri "$B/experiments/demo/tiny-sft-lora" \
  --workdir "$DEMO/workdir" --result-file "$DEMO/result.json"
$ENGINE pull "$B/experiments/demo/tiny-sft-lora/checkpoint-final" "$DEMO/final-model"
$PY -m finetune_engine.cli.chat "$DEMO/final-model" "What is the capital of France?" 2>/dev/null
echo
echo "result:        $DEMO/result.json"
echo "bucket:        $B/experiments/demo/tiny-sft-lora/ (files under $DEMO/s3/data/)"
echo "merged model:  $DEMO/final-model"
echo "S3 server:     $AWS_ENDPOINT_URL (keys in $DEMO/s3/s3.env; stop: $ENGINE local-s3 stop --dir $DEMO/s3)"
