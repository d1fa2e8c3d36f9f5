"""Continued pretraining data: plain .txt files -> fixed context windows, cached by content hash.

Each file is one document: ``[BOS] text [EOT]`` (BOS when the tokenizer has one distinct from
EOT), documents back to back in one token stream. The stream is cut into windows of
``context_length`` tokens; a full window ends at the best boundary (document > paragraph > line)
within its last ``max_boundary_waste`` instead of mid-sentence, and the rest starts the next
window. Text is tokenized literally (a "</s>" inside a file is text, not EOT), in forked worker
processes, in pieces split at paragraph breaks so one huge file still spreads over the workers.

The windows are cached under ``cache_dir/<key>.npz``; the key is the sha256 of every file's
contents (in order), the tokenizer (its full serialization) and the window settings, so a second
run with the same inputs skips tokenization.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune_engine.config import schema
from finetune_engine.data.tokenize import IGNORE_INDEX
from finetune_engine.data.validate import list_text_files, validate_text_files  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
PIECE_CHARS = 200_000  # documents are tokenized in pieces of about this size (cut at paragraph breaks)
TASK_CHARS = 1_000_000  # characters per worker task
LEVELS = {"none": 4, "document": 3, "paragraph": 2, "line": 1}  # boundary after a token: 3 = document end


@dataclass(frozen=True)
class WindowSettings:
    context_length: int
    boundary: str = "paragraph"
    max_boundary_waste: float = 0.1
    eot_token_id: int = 0
    bos_token_id: int | None = None


def _read_text(path: Path) -> str:
    # Universal newlines: \r\n and \r count as line breaks like \n.
    with open(path, encoding="utf-8-sig") as f:
        return f.read()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------


def split_pieces(text: str, size: int) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters, after a paragraph break where one is
    near, else after a line break, else anywhere. Concatenated, the pieces are ``text``."""
    pieces = []
    start = 0
    while len(text) - start > size:
        lo, hi = start + size // 2, start + size
        cut = text.rfind("\n\n", lo, hi)
        cut = cut + 2 if cut >= 0 else text.rfind("\n", lo, hi) + 1 or hi
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def tokenize_pieces(pieces: list[str], tokenizer: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, boundary level after each token: 2 paragraph, 1 line, 0 none) per piece."""
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(
        pieces,
        add_special_tokens=False,
        return_attention_mask=False,
        split_special_tokens=True,
        return_offsets_mapping=fast,
    )
    out = []
    for i, ids in enumerate(enc["input_ids"]):
        arr = np.asarray(ids, dtype=np.int32)
        levels = np.zeros(len(arr), dtype=np.int8)
        if fast and len(arr):
            ends = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)[:, 1]
            codes = np.frombuffer(pieces[i].encode("utf-32-le"), dtype=np.uint32)
            newline = np.concatenate([[False, False], codes == 10])  # index e+1 = char e-1
            last = newline[np.clip(ends + 1, 0, None)] & (ends >= 1)
            before = newline[np.clip(ends, 0, None)] & (ends >= 2)
            levels = last.astype(np.int8) + (last & before).astype(np.int8)
        out.append((arr, levels))
    return out


def _tokenize_task(task: list[str], tokenizer: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    return tokenize_pieces(task, tokenizer)


def build_stream(
    texts: list[str], tokenizer: Any, settings: WindowSettings, workers: int = 1
) -> tuple[np.ndarray, np.ndarray, int]:
    """One token stream of every non-empty document: ids, boundary levels, documents used."""
    from finetune_engine.data.workers import forked_map

    docs = [t for t in texts if t.strip()]
    pieces_per_doc = [split_pieces(t, PIECE_CHARS) for t in docs]
    flat = [p for pieces in pieces_per_doc for p in pieces]
    tasks: list[list[str]] = [[]]
    size = 0
    for piece in flat:
        if size >= TASK_CHARS:
            tasks.append([])
            size = 0
        tasks[-1].append(piece)
        size += len(piece)
    encoded = (
        [item for part in forked_map(_tokenize_task, tasks, workers, tokenizer) for item in part]
        if flat
        else []
    )
    ids_parts: list[np.ndarray] = []
    level_parts: list[np.ndarray] = []
    at = 0
    bos = settings.bos_token_id
    for pieces in pieces_per_doc:
        if bos is not None:
            ids_parts.append(np.asarray([bos], dtype=np.int32))
            level_parts.append(np.zeros(1, dtype=np.int8))
        for ids, levels in encoded[at : at + len(pieces)]:
            ids_parts.append(ids)
            level_parts.append(levels)
        at += len(pieces)
        ids_parts.append(np.asarray([settings.eot_token_id], dtype=np.int32))
        level_parts.append(np.asarray([LEVELS["document"]], dtype=np.int8))
    if not ids_parts:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int8), 0
    return np.concatenate(ids_parts), np.concatenate(level_parts), len(docs)


def make_windows(levels: np.ndarray, settings: WindowSettings) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the windows over a stream with these boundary levels.

    A window is ``context_length`` tokens unless it ends at a boundary: the highest-level boundary
    (latest among equals) within its last ``max_boundary_waste`` tokens, at least ``boundary``.
    Windows shorter than 2 tokens (nothing to predict) are dropped."""
    n, size = len(levels), settings.context_length
    slack = int(size * settings.max_boundary_waste)
    cuts = np.flatnonzero(levels >= LEVELS[settings.boundary]) + 1  # cut after a boundary token
    cut_levels = levels[cuts - 1]
    starts, ends = [], []
    start = 0
    while start < n:
        end = start + size
        if end >= n:
            end = n
        elif slack and len(cuts):
            lo = max(np.searchsorted(cuts, end - slack, "left"), np.searchsorted(cuts, start, "right"))
            hi = np.searchsorted(cuts, end, "right")
            if lo < hi:
                window_levels = cut_levels[lo:hi]
                end = int(cuts[lo + np.flatnonzero(window_levels == window_levels.max())[-1]])
        if end - start >= 2:
            starts.append(start)
            ends.append(end)
        start = end
    return np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Cache and the dataset
# ---------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items())) + type(tokenizer).__name__
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(file_hashes: list[str], tokenizer: Any, settings: WindowSettings) -> str:
    blob = json.dumps(
        {
            "format": CACHE_FORMAT,
            "pieces": PIECE_CHARS,
            "files": file_hashes,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "settings": asdict(settings),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def default_cache_dir() -> Path:
    env = os.environ.get("FINETUNE_CACHE_DIR")
    return Path(env) / "text-windows" if env else Path.home() / ".cache" / "finetune-engine" / "text-windows"


class WindowDataset:
    """Windows as training rows ({'input_ids', 'labels'}), sliced from one array on demand.

    Every token is trained except BOS (nothing should learn to predict a document start)."""

    def __init__(self, ids: np.ndarray, starts: np.ndarray, ends: np.ndarray, bos_token_id: int | None):
        self.ids, self.starts, self.ends, self.bos = ids, starts, ends, bos_token_id

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        window = self.ids[self.starts[i] : self.ends[i]]
        labels = window.astype(np.int64)
        if self.bos is not None:
            labels[window == self.bos] = IGNORE_INDEX
        labels[0] = IGNORE_INDEX  # nothing predicts the first token
        return {"input_ids": window.tolist(), "labels": labels.tolist()}

    def subset(self, indices: list[int]) -> WindowDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return WindowDataset(self.ids, self.starts[idx], self.ends[idx], self.bos)

    def lengths(self) -> np.ndarray:
        return self.ends - self.starts


def load_windows(
    paths: list[str],
    tokenizer: Any,
    settings: WindowSettings,
    workers: int = 1,
    cache_dir: str | Path | None = None,
    where: str = "data_conf.training_data.datasets",
) -> tuple[WindowDataset, dict[str, Any]]:
    """Windows of the text files in ``paths`` and stats; from the cache when the key matches."""
    files = list_text_files(paths, where)
    hashes = [file_sha256(f) for f in files]
    key = cache_key(hashes, tokenizer, settings)
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    cached = folder / f"{key}.npz"
    t0 = time.monotonic()
    if cached.is_file():
        try:
            with np.load(cached) as z:
                ids, starts, ends, docs = z["ids"], z["starts"], z["ends"], int(z["documents"])
            stats = {
                "cache": "hit",
                "cache_file": str(cached),
                "files": len(files),
                "documents": docs,
                "tokens": int(len(ids)),
                "windows": int(len(starts)),
                "seconds": round(time.monotonic() - t0, 3),
            }
            log.info(
                "text windows from cache %s: %d windows of <= %d tokens (%d tokens, %d documents)",
                cached,
                len(starts),
                settings.context_length,
                len(ids),
                docs,
            )
            return WindowDataset(ids, starts, ends, settings.bos_token_id), stats
        except (OSError, ValueError, KeyError) as err:
            log.warning("text window cache %s is unreadable (%s); tokenizing again", cached, err)
    texts = [_read_text(f) for f in files]
    ids, levels, docs = build_stream(texts, tokenizer, settings, workers)
    starts, ends = make_windows(levels, settings)
    seconds = time.monotonic() - t0
    lengths = ends - starts
    log.info(
        "tokenized %d text files (%d documents, %.1f MB) in %.1fs with %d worker(s): %d tokens, %d windows "
        "of <= %d tokens, %d at a boundary, padding %.1f%%",
        len(files),
        docs,
        sum(map(len, texts)) / 1e6,
        seconds,
        max(workers, 1),
        len(ids),
        len(starts),
        settings.context_length,
        int((lengths < settings.context_length).sum()),
        100 * (1 - lengths.sum() / max(len(starts) * settings.context_length, 1)),
    )
    stats = {
        "cache": "miss",
        "cache_file": None,
        "files": len(files),
        "documents": docs,
        "tokens": int(len(ids)),
        "windows": int(len(starts)),
        "seconds": round(seconds, 3),
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.npz"
        np.savez(tmp, ids=ids, starts=starts, ends=ends, documents=np.asarray(docs))
        os.replace(tmp, cached)  # whole or absent: concurrent ranks may write the same key
        stats["cache_file"] = str(cached)
    except OSError as err:
        log.warning(
            "cannot write the text window cache in %s (%s); set data_conf.training_data.cache_dir "
            "or FINETUNE_CACHE_DIR to a writable directory",
            folder,
            err,
        )
    return WindowDataset(ids, starts, ends, settings.bos_token_id), stats


def window_settings(td: schema.TextFilesData, tokenizer: Any, max_seq_length: int) -> WindowSettings:
    eot = td.eot_token or tokenizer.eos_token
    if eot is None:
        raise ValueError(
            "data_conf.training_data.eot_token: the tokenizer has no EOS token; name the end-of-text token"
        )
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    if eot_id is None or (eot_id == tokenizer.unk_token_id and eot != tokenizer.unk_token):
        raise ValueError(
            f"data_conf.training_data.eot_token {eot!r} is not a token of the tokenizer; "
            "give one token, e.g. its EOS token"
        )
    bos = tokenizer.bos_token_id
    return WindowSettings(
        context_length=td.context_length or max_seq_length,
        boundary=td.boundary,
        max_boundary_waste=td.max_boundary_waste,
        eot_token_id=int(eot_id),
        bos_token_id=int(bos) if bos is not None and bos != eot_id else None,
    )


def load_text_data(
    conf: schema.DataConf, tokenizer: Any, max_seq_length: int, workers: int = 1
) -> tuple[WindowDataset, WindowDataset | None, dict[str, Any]]:
    """(train windows, validation windows or None, stats) as data_conf describes."""
    from finetune_engine.data.load import split

    td = conf.training_data
    settings = window_settings(td, tokenizer, max_seq_length)
    windows, stats = load_windows([d.path for d in td.datasets], tokenizer, settings, workers, td.cache_dir)
    vd = conf.validation_data
    evaluation = None
    if isinstance(vd, schema.AutoSplitValidation):
        train_idx, eval_idx = split(list(range(len(windows))), vd.ratio, vd.seed, unit="window")
        windows, evaluation = windows.subset(train_idx), windows.subset(eval_idx)
    elif isinstance(vd, schema.ConcatenationValidation):
        evaluation, eval_stats = load_windows(
            [d.path for d in vd.datasets],
            tokenizer,
            settings,
            workers,
            td.cache_dir,
            where="data_conf.validation_data.datasets",
        )
        stats["validation"] = eval_stats
    log.info(
        "text data: %d training, %d validation windows",
        len(windows),
        len(evaluation) if evaluation is not None else 0,
    )
    return windows, evaluation, stats
