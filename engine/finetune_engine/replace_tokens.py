"""``replace_tokens TOKENIZER OUTPATH --from A --to B [--from C --to D ...]``: rename tokens.

The Silogen engine's command: the tokenizer is saved to OUTPATH, then every occurrence of each
``--from`` string in its files is replaced by the paired ``--to`` string, in the order given, so the
renamed token keeps its id (e.g. ``<|assistant|>`` -> ``<|im_start|>``). The replacement is literal
text. Besides the Silogen engine's four files (tokenizer_config.json, tokenizer.json,
special_tokens_map.json, added_tokens.json) the chat template files are rewritten too, since
transformers 5 keeps the chat template in chat_template.jinja rather than in tokenizer_config.json.

The new tokenizer is built in a temporary directory and checked to load before it is moved into
OUTPATH, so a failure leaves nothing partial.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def modify_tokenizer_files(tokenizer_directory: str | Path, replacements: dict[str, str]) -> list[Path]:
    """Replace each key of ``replacements`` by its value, in order, in the tokenizer files of
    ``tokenizer_directory`` (in place). Returns the files changed."""
    directory = Path(tokenizer_directory)
    present = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not present:
        raise FileNotFoundError(f"No tokenizer files found in {directory}")
    changed = []
    for path in present:
        text = original = path.read_text(encoding="utf-8")
        for token_from, token_to in replacements.items():
            text = text.replace(token_from, token_to)
        if text != original:
            path.write_text(text, encoding="utf-8")
            changed.append(path)
    return changed


def replace_tokens(tokenizer: str, outpath: str | Path, replacements: dict[str, str]) -> Path:
    """Save ``tokenizer`` (a path or Hub id) to ``outpath`` with the tokens renamed."""
    from transformers import AutoTokenizer

    outpath = Path(outpath)
    source = AutoTokenizer.from_pretrained(tokenizer)
    missing = [t for t in replacements if t not in source.get_vocab()]
    if missing:
        log.warning("not tokens of %s (replaced as text wherever they occur): %s", tokenizer, missing)
    outpath.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".replace_tokens-", dir=outpath.parent) as tmp:
        source.save_pretrained(tmp)
        changed = modify_tokenizer_files(tmp, replacements)
        if not changed:
            log.warning("none of %s occurs in the tokenizer files; the copy is unchanged", list(replacements))
        try:
            AutoTokenizer.from_pretrained(tmp)
        except Exception as err:  # noqa: BLE001 - any load failure means the replacement broke the files
            raise ValueError(
                f"the tokenizer with {replacements} replaced does not load ({err}); nothing was written"
            ) from None
        outpath.mkdir(parents=True, exist_ok=True)
        for path in Path(tmp).iterdir():
            shutil.move(str(path), outpath / path.name)
    log.info(
        "saved %s to %s with %s replaced (%s)",
        tokenizer,
        outpath,
        replacements,
        ", ".join(p.name for p in changed) or "no file changed",
    )
    return outpath


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="replace_tokens",
        description="Replaces tokens, specify pairs like:\n"
        "--from <|assistant|> --to <|im_start|> --from <|user|> --to <|im_end|>",
    )
    parser.add_argument("tokenizer", type=str, help="Name (e.g. HuggingFace Hub id) or Path of Tokenizer")
    parser.add_argument("outpath", type=str, help="Where to save the tokenizer")
    parser.add_argument(
        "--from",
        type=str,
        action="append",
        required=True,
        help="The token to remove, specify in pairs with --to",
    )
    parser.add_argument(
        "--to",
        type=str,
        action="append",
        required=True,
        help="The token to replace with, specify in pairs with --from",
    )
    args = parser.parse_args(argv)
    sources = getattr(args, "from")
    if len(sources) != len(args.to):
        parser.error("Different number of --from and --to specified!")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        replace_tokens(args.tokenizer, args.outpath, dict(zip(sources, args.to, strict=True)))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
