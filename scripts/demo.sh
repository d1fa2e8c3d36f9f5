#!/usr/bin/env bash
# The main job on one machine: the tutorial DAG end to end with `airflow dags test` on the local
# runner — embedded S3 server, tiny model built here, deliver -> 3-rank LoRA sweep -> pick best ->
# merge -> serve with vLLM (CPU) -> chat. State lives in $FINETUNE_DEMO_DIR (default .work/).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
./scripts/setup.sh &
setup_pid=$!
./scripts/setup-vllm.sh          # in parallel with the main venv: the two installs are independent
wait $setup_pid
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DISABLE_MLFLOW_INTEGRATION=${DISABLE_MLFLOW_INTEGRATION:-TRUE}
DEMO=$(mkdir -p "${FINETUNE_DEMO_DIR:-.work}" && cd "${FINETUNE_DEMO_DIR:-.work}" && pwd)
ENGINE=.venv/bin/finetune-engine
$ENGINE local-s3 start --dir "$DEMO/s3"
set -a; . "$DEMO/s3/s3.env"; set +a
[[ -f $DEMO/tiny-model/config.json ]] || TQDM_DISABLE=1 .venv/bin/python -m finetune_engine.tiny model "$DEMO/tiny-model" >/dev/null

export AIRFLOW_HOME="$DEMO/airflow" AIRFLOW__CORE__DAGS_FOLDER="$PWD/dags" AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__FINETUNE__RUNNER=local AIRFLOW__FINETUNE__LOCAL_WORKDIR="$DEMO/work" AIRFLOW__FINETUNE__BUCKET="$FINETUNE_BUCKET"
export AIRFLOW__FINETUNE__VLLM_PYTHON="$PWD/.venv-vllm/bin/python"
# a tiny model on the CPU: skip vLLM's torch.compile warm-up, the server answers ~20 s sooner
export AIRFLOW__FINETUNE__LOCAL_VLLM_ENGINE_ARGS='{"enforce_eager": true}'
export AIRFLOW_CONN_AWS_DEFAULT="{\"conn_type\": \"aws\", \"login\": \"$AWS_ACCESS_KEY_ID\", \"password\": \"$AWS_SECRET_ACCESS_KEY\", \"extra\": {\"endpoint_url\": \"$AWS_ENDPOINT_URL\"}}"
# the tutorial DAG's defaults for this machine: the tiny model, its data and config ([finetune] dag_defaults)
export AIRFLOW__FINETUNE__DAG_DEFAULTS=$(.venv/bin/python -c 'import json, sys; print(json.dumps({"finetune_tutorial": {
  "model_id": sys.argv[1], "data_script": "examples/tiny_data_script.py", "dataset_file": "tiny-chat.jsonl",
  "config": "engine/configs/tiny-sft-lora.yaml"}}))' "$DEMO/tiny-model")
ENDPOINT_S3=$AWS_ENDPOINT_URL
unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL   # the tasks get them from the connection
.venv/bin/airflow db migrate >/dev/null
# FINETUNE_DEMO_CONF: another DAG-run conf (the Params of the tutorial DAG), e.g. with "full_param_gpus": 1
conf=${FINETUNE_DEMO_CONF:-'{"ranks": [4, 8, 16], "max_steps": 120, "gpus": 0, "run_name": "demo", "question": "What is the capital of France?"}'}
.venv/bin/airflow dags test finetune_tutorial -c "$conf" > "$DEMO/tutorial-run.log" 2>&1 || {
  echo "the tutorial DAG failed; see $DEMO/tutorial-run.log"; tail -40 "$DEMO/tutorial-run.log"; exit 1; }
grep -q "state=success" "$DEMO/tutorial-run.log" || { echo "the tutorial DAG did not succeed; see $DEMO/tutorial-run.log"; exit 1; }
echo
grep -E "eval loss by rank" "$DEMO/tutorial-run.log" | sed 's/^.*eval loss/eval loss/' | head -1
grep -A1 -E "^user: " "$DEMO/tutorial-run.log" | head -2
endpoint=$(grep -oE "endpoint: http://127.0.0.1:[0-9]+/v1" "$DEMO/tutorial-run.log" | head -1 | cut -d' ' -f2)
echo
echo "time to first chat: $(( $(date +%s) - t0 ))s (installs included)"
echo "DAG run log:   $DEMO/tutorial-run.log (Airflow home $DEMO/airflow)"
echo "bucket:        s3://$FINETUNE_BUCKET/experiments/tutorial/demo/ (files under $DEMO/s3/data/)"
echo "S3 server:     $ENDPOINT_S3 (keys in $DEMO/s3/s3.env; stop: $ENGINE local-s3 stop --dir $DEMO/s3)"
keep_serving=$(.venv/bin/python -c 'import json, sys; print(json.loads(sys.argv[1]).get("keep_serving", True))' "$conf")
if [[ $keep_serving == True && -n $endpoint ]]; then
  echo "vLLM serving:  $endpoint — chat with it:"
  echo "  curl $endpoint/chat/completions -H 'Content-Type: application/json' -d '{\"model\": \"tutorial\", \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}], \"temperature\": 0}'"
  echo "  stop it:     kill -- -\$(cat $DEMO/work/serving/*/server.pid)"
fi
