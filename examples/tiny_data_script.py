"""A data script (the seed's contract): write JSONL files into $FINETUNE_DATA_DIR.

It runs in a subprocess with no credentials. This one generates the tiny chat dataset; a real one
would load a Hub dataset and map it to `messages`, e.g.
    ds = datasets.load_dataset("argilla/...", split="train")
    ds.map(to_messages).to_json(os.path.join(out, "argilla.jsonl"))
"""

import os

from finetune_engine.tiny import write_chat_dataset

write_chat_dataset(os.path.join(os.environ["FINETUNE_DATA_DIR"], "tiny-chat.jsonl"), examples=400, seed=0)
