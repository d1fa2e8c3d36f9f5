#!/usr/bin/env bash
# Build the tiny model and data locally, fine-tune it with LoRA (chat-ml, packing, completions-only),
# then chat with the merged result. Everything lands under .work/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DISABLE_MLFLOW_INTEGRATION=${DISABLE_MLFLOW_INTEGRATION:-TRUE}
PY=.venv/bin/python
mkdir -p .work
[[ -f .work/tiny-model/config.json ]] || $PY -m finetune_engine.tiny model .work/tiny-model
[[ -f .work/tiny-chat.jsonl ]] || $PY -m finetune_engine.tiny data .work/tiny-chat.jsonl --examples 400
.venv/bin/finetuning sft engine/configs/tiny-sft-lora.yaml --result-file .work/result.json
$PY -m finetune_engine.cli.chat .work/experiments/tiny-sft-lora/checkpoint-final "What is the capital of France?"
echo
echo "result:        .work/result.json"
echo "merged model:  .work/experiments/tiny-sft-lora/checkpoint-final"
echo "adapter:       .work/experiments/tiny-sft-lora/checkpoint-final-adapter"
