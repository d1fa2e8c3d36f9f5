#!/usr/bin/env bash
# Build the tiny model and data locally, fine-tune it with LoRA (chat-ml, packing, completions-only),
# then chat with the merged result. Everything lands under $FINETUNE_DEMO_DIR (default .work/).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DISABLE_MLFLOW_INTEGRATION=${DISABLE_MLFLOW_INTEGRATION:-TRUE}
DEMO=${FINETUNE_DEMO_DIR:-.work}
PY=.venv/bin/python
mkdir -p "$DEMO"
[[ -f $DEMO/tiny-model/config.json ]] || $PY -m finetune_engine.tiny model "$DEMO/tiny-model" >/dev/null
[[ -f $DEMO/tiny-chat.jsonl ]] || $PY -m finetune_engine.tiny data "$DEMO/tiny-chat.jsonl" --examples 400 >/dev/null
.venv/bin/finetuning sft engine/configs/tiny-sft-lora.yaml \
  --set "run_conf.model=$DEMO/tiny-model" \
  --set "data_conf.training_data.datasets[0].path=$DEMO/tiny-chat.jsonl" \
  --set "training_args.output_dir=$DEMO/experiments/tiny-sft-lora" \
  --result-file "$DEMO/result.json"
$PY -m finetune_engine.cli.chat "$DEMO/experiments/tiny-sft-lora/checkpoint-final" "What is the capital of France?" 2>/dev/null
echo
echo "result:        $DEMO/result.json"
echo "merged model:  $DEMO/experiments/tiny-sft-lora/checkpoint-final"
echo "adapter:       $DEMO/experiments/tiny-sft-lora/checkpoint-final-adapter"
