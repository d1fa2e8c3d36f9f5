"""Data script of the retraining DAGs: fresh training data each run, a fixed held-out set.

Writes into $FINETUNE_DATA_DIR (the seed's contract; no credentials in this process):
  train.jsonl    new examples (a different sample every run: the "new data" that landed)
  heldout.jsonl  the same examples every run, never trained on: champion and challenger are
                 scored on it
A real script would export the newest labelled conversations from the product's store.
"""

import os
import time

from finetune_engine.tiny import write_chat_dataset

out = os.environ["FINETUNE_DATA_DIR"]
write_chat_dataset(os.path.join(out, "train.jsonl"), examples=400, seed=int(time.time()))
write_chat_dataset(os.path.join(out, "heldout.jsonl"), examples=80, seed=424242)
