"""Run inside the vLLM CPU venv: for each family, load its merged model, then its base with the LoRA
adapter, in this one process with vLLM's offline API, and chat through the model's own template.

    python vllm_families_driver.py JOBS.json OUT.json

JOBS: [{"name", "merged", "base", "adapter", "rank"}]. OUT: {name: {"merged": [ids], "base": [ids],
"lora": [ids], "prompt": text}} or {name: {"error": text}}: a family vLLM cannot load is recorded,
the next one still runs.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback

MESSAGES = [{"role": "user", "content": "What is the capital of Peru?"}]


def main(jobs_path: str, out_path: str) -> int:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    jobs = json.loads(open(jobs_path).read())
    params = SamplingParams(max_tokens=6, temperature=0.0)
    common = dict(
        dtype="float32",
        enforce_eager=True,
        distributed_executor_backend="uni",
        max_model_len=256,
        max_num_seqs=4,
        seed=0,
    )
    out: dict[str, dict] = {}
    for job in jobs:
        started, result = time.monotonic(), {}
        for key, kwargs in (
            ("merged", {"model": job["merged"]}),
            (
                "lora",
                {"model": job["base"], "enable_lora": True, "max_lora_rank": job["rank"], "max_loras": 1},
            ),
        ):
            llm = None
            try:
                llm = LLM(**kwargs, **common)
                reply = llm.chat(MESSAGES, params, use_tqdm=False)[0]
                result[key] = list(reply.outputs[0].token_ids)
                result[f"{key}_prompt"] = reply.prompt
                if key == "lora":
                    request = LoRARequest("tuned", 1, job["adapter"])
                    tuned = llm.chat(MESSAGES, params, lora_request=request, use_tqdm=False)[0]
                    result["base"], result["lora"] = result["lora"], list(tuned.outputs[0].token_ids)
            except Exception as err:  # noqa: BLE001 - recorded per family, quoted by the test
                lines = traceback.format_exception_only(type(err), err)
                result[f"{key}_error"] = "".join(lines).strip()[-1500:]
            finally:
                del llm
                gc.collect()
        result["seconds"] = round(time.monotonic() - started, 1)
        out[job["name"]] = result
        print(job["name"], json.dumps(result), flush=True)
    with open(out_path, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
