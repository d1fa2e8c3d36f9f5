"""The seed tutorial's data script: Argilla's Mistral-Large answers to human prompts, as `messages`.

Runs in the data delivery pod (network to the Hub, no credentials). Writes argilla.jsonl into
$FINETUNE_DATA_DIR.
"""

import os

import datasets

ds = datasets.load_dataset("argilla/ultrafeedback-binarized-preferences-cleaned", split="train")


def to_messages(row):
    return {
        "messages": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["chosen"][-1]["content"]},
        ]
    }


ds = ds.map(to_messages, remove_columns=ds.column_names)
ds.to_json(os.path.join(os.environ["FINETUNE_DATA_DIR"], "argilla.jsonl"))
