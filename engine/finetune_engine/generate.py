"""``generate CONFIG OUT``: Hugging Face generation over open prompts or an eval file, YAML output.

Two config formats. The Silogen engine's (``model_conf``, ``prompt_conf``, ``hf_gen_params``,
``quant_conf``) is run as that engine runs it and writes its output format; see
:func:`generate_silogen`. This engine's own short format::

    model: path/to/model            # a full model, or base + adapter below
    adapter: null                   # optional LoRA adapter directory
    prompts: ["What is 2 plus 3?"]  # open prompts, and/or
    eval_file: eval.jsonl           # `messages` (last assistant turn = correct answer) or prompt/completion
    max_new_tokens: 64
    temperature: 0.0                # 0 = greedy
    batch_size: 8

Output: a YAML list; each item has ``prompt``, ``answer`` and ``correct_answers``.

Silogen format::

    model_conf:
      model: path/to/model          # plus optional adapter, tokenizer (default: adapter, else model),
      model_args: {dtype: bfloat16} # model_args: from_pretrained keyword arguments
    prompt_conf:
      type: open-input              # sample num_samples continuations of `input` (default "")
      input: "Once upon a time"
      num_samples: 2
    # or: prompt_conf: {type: eval-data, data: {path: eval.jsonl}}, rows with `prompt_messages`
    # (and `response`, `dataset`, `id`), or chat rows with `messages` (last assistant turn = response)
    hf_gen_params: {max_new_tokens: 64, do_sample: false}   # transformers.GenerationConfig
    quant_conf: {quantization_type: bits-and-bytes, load_in_4bit: true}

Output: a YAML list; each item has ``dataset``, ``id``, ``prompt`` (the full prompt text),
``answer``, ``correct_answers``, ``test_type``, ``data_collection``, ``truncated``,
``all_text_raw`` and ``gen_params`` (the generation parameters with their defaults, and the
``quant_conf`` and ``model_conf`` as given).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from finetune_engine.config import schema
from finetune_engine.config.errors import ConfigError
from finetune_engine.config.yamlio import safe_load
from finetune_engine.embeddings import fit_embeddings

log = logging.getLogger(__name__)


class GenerateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    adapter: str | None = None
    prompts: list[str] = Field(default_factory=list)
    eval_file: str | None = None
    max_new_tokens: int = Field(default=64, gt=0)
    temperature: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=8, gt=0)


def load_items(cfg: GenerateConfig) -> list[dict[str, Any]]:
    items = [{"messages": [{"role": "user", "content": p}], "correct_answers": []} for p in cfg.prompts]
    if cfg.eval_file:
        from finetune_engine.data.validate import iter_records, validate_files

        validate_files([cfg.eval_file], method="sft")
        for _, rec in iter_records(cfg.eval_file):
            if "messages" in rec:
                msgs = rec["messages"]
                last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
                items.append({"messages": msgs[:last], "correct_answers": [msgs[last]["content"]]})
            elif "prompt" in rec:
                items.append(
                    {
                        "messages": [{"role": "user", "content": rec["prompt"]}],
                        "correct_answers": [rec["completion"]],
                    }
                )
    if not items:
        raise ValueError("nothing to generate: give prompts or an eval_file")
    return items


def generate_answers(
    model,
    tok,
    items: list[dict[str, Any]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    batch_size: int = 8,
    chat: bool = True,
) -> list[str]:
    """The model's continuation of each item: ``messages`` rendered with the chat template and a
    generation prompt (``chat``), or ``text`` continued as it is (BOS first, as in training).

    Left padding and the KV cache are switched on for the call and restored after; the model is
    left in the mode it was in (generation may run in the middle of training)."""
    import torch

    from finetune_engine.data.tokenize import with_bos

    side, pad, was_training = tok.padding_side, tok.pad_token, model.training
    tok.padding_side = "left"
    if pad is None:
        tok.pad_token = tok.eos_token  # pads are masked; any id will do
    pad_id = tok.pad_token_id
    bos = tok.bos_token if tok.bos_token and tok.bos_token != tok.eos_token else ""
    model.eval()
    answers: list[str] = []
    try:
        for i in range(0, len(items), batch_size):
            batch = items[i : i + batch_size]
            if chat:
                texts = [
                    with_bos(
                        tok,
                        tok.apply_chat_template(it["messages"], tokenize=False, add_generation_prompt=True),
                    )
                    for it in batch
                ]
            else:
                texts = [bos + it["text"] for it in batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            enc.pop("token_type_ids", None)
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=temperature > 0,
                    temperature=temperature or None,
                    pad_token_id=pad_id,
                    use_cache=True,
                )
            answers += [
                tok.decode(row, skip_special_tokens=True) for row in gen[:, enc["input_ids"].shape[1] :]
            ]
    finally:
        tok.padding_side = side
        if pad is None:
            tok.pad_token = None
        model.train(was_training)
    return answers


def generate(cfg: GenerateConfig) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.adapter or cfg.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg.model)
    fit_embeddings(model, tok)  # the run added tokens: grow, never shrink
    if cfg.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.adapter)
    model.eval()
    items = load_items(cfg)
    out = []
    for i in range(0, len(items), cfg.batch_size):
        batch = items[i : i + cfg.batch_size]
        answers = generate_answers(model, tok, batch, cfg.max_new_tokens, cfg.temperature, cfg.batch_size)
        for it, answer in zip(batch, answers, strict=True):
            out.append(
                {
                    "prompt": it["messages"][-1]["content"],
                    "answer": answer.strip(),
                    "correct_answers": it["correct_answers"],
                }
            )
        log.info("generated %d / %d", min(i + cfg.batch_size, len(items)), len(items))
    return out


# ---------------------------------------------------------------------------------------------
# The Silogen engine's generation config and output
# ---------------------------------------------------------------------------------------------

SILOGEN_KEYS = ("model_conf", "prompt_conf", "hf_gen_params", "quant_conf")
OPEN_PROMPT_DATASET = "_open_prompt_data_"


class _SilogenStrict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class InferenceModelConf(_SilogenStrict):
    model: str = Field(description="Model Hub id or path.")
    model_args: dict[str, Any] = Field(default_factory=dict, description="from_pretrained keyword arguments.")
    adapter: str | None = Field(default=None, description="Adapter Hub id or path, or none.")
    tokenizer: str | None = Field(
        default=None, description="Tokenizer; default: the adapter's, else the model's."
    )


class OpenPromptConf(_SilogenStrict):
    type: Literal["open-input"]
    input: str = Field(default="", description="The text to continue.")
    num_samples: int = Field(default=1, ge=1, description="How many continuations.")


class EvalDataset(_SilogenStrict):
    path: str = Field(description="JSONL (or JSON array) file of prompts.")


class EvalDataPromptConf(_SilogenStrict):
    type: Literal["eval-data"]
    data: EvalDataset


class SilogenGenerationConfig(_SilogenStrict):
    model_conf: InferenceModelConf
    prompt_conf: Annotated[OpenPromptConf | EvalDataPromptConf, Field(discriminator="type")]
    hf_gen_params: dict[str, Any] = Field(default_factory=dict)
    quant_conf: schema.QuantConf = Field(
        default_factory=lambda: schema.NoQuantization(quantization_type="no-quantization")
    )


class GenerationConfigError(ConfigError):
    """A generation config that cannot run; one line per bad key."""

    def __init__(self, source: str, problems: list[str]):
        super().__init__(source, problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        self.args = (f"invalid generation config {source}: {len(problems)} problem(s)\n{lines}",)


_TAGS = {"open-input", "eval-data", "no-quantization", "bits-and-bytes"}


def _field_names(model: type[BaseModel], seen: set | None = None) -> set[str]:
    import typing

    seen = seen if seen is not None else set()
    names: set[str] = set()
    if model in seen:
        return names
    seen.add(model)
    for name, f in model.model_fields.items():
        names.add(name)
        stack = [f.annotation]
        while stack:
            ann = stack.pop()
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                names |= _field_names(ann, seen)
            stack += list(typing.get_args(ann))
    return names


def config_problems(err: ValidationError, root: type[BaseModel], text: str, source: str) -> list[str]:
    """One readable line per problem: key path, file:line, what is wrong and the fix."""
    from finetune_engine.config.loader import _fmt_path, _yaml_lines

    lines = _yaml_lines(text)
    vocab = sorted(_field_names(root))
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in _TAGS and not str(p).startswith("function-"))
        where = _fmt_path(loc) or "(top level)"
        line = lines.get(loc) or (lines.get(loc[:-1]) if e["type"] == "missing" and loc[:-1] else None)
        at = f" ({source}:{line})" if line else ""
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), vocab, n=1)
            problems.append(
                f"{where}{at}: unknown key{f'; did you mean {close[0]!r}?' if close else '; remove it'}"
            )
        elif e["type"] == "missing":
            problems.append(f"{where}{at}: required key is missing")
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            ctx = e.get("ctx", {})
            disc = str(ctx.get("discriminator", "type")).strip("'")
            tags = [t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",") if t.strip()]
            problems.append(
                f"{where}{at}: {disc} {ctx.get('tag')!r} is not one of {', '.join(tags)}"
                if ctx.get("tag") is not None
                else f"{where}{at}: {disc} is missing"
            )
        else:
            problems.append(f"{where}{at}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
    return problems


def parse_generation_config(
    data: Any, text: str = "", source: str = "<config>"
) -> SilogenGenerationConfig | GenerateConfig:
    """The Silogen engine's config when any of its sections is present, else this engine's format."""
    if not isinstance(data, dict):
        raise GenerationConfigError(source, [f"expected a mapping of sections, got {type(data).__name__}"])
    silogen = any(k in data for k in SILOGEN_KEYS)
    root: type[BaseModel] = SilogenGenerationConfig if silogen else GenerateConfig
    try:
        return root.model_validate(data)
    except ValidationError as err:
        problems = config_problems(err, root, text, source)
        if silogen and any(k in data for k in GenerateConfig.model_fields if k not in SILOGEN_KEYS):
            problems.append(
                "this mixes the Silogen format (model_conf, prompt_conf, ...) with the short format "
                "(model, prompts, eval_file, ...); use one"
            )
        raise GenerationConfigError(source, problems) from None


def _messages_ok(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )


def load_eval_rows(path: str) -> list[dict[str, Any]]:
    """Eval rows: ``prompt_messages`` (+ ``response``), a preference row (its chosen reply is the
    response) or a chat row with ``messages`` (its last assistant turn is the response)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise ValueError(f"prompt_conf.data.path: cannot read {path}: {err}") from None
    if text.lstrip().startswith("["):
        try:
            records = [(i + 1, r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
        unit = "item"
    else:
        records = []
        for number, raw in enumerate(text.splitlines(), 1):
            if raw.strip():
                try:
                    records.append((number, json.loads(raw)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON: {err.msg}") from None
        unit = "line"
    rows, problems = [], []
    for number, rec in records:
        where = f"{path}:{number}" if unit == "line" else f"{path} item {number}"
        if not isinstance(rec, dict):
            problems.append(f"{where}: expected an object with prompt_messages or messages")
            continue
        if "prompt_messages" in rec:
            prompt = rec["prompt_messages"]
            response = rec.get("response")
            if response is None and _messages_ok(rec.get("chosen_messages")):
                answers = [m["content"] for m in rec["chosen_messages"] if m["role"] == "assistant"]
                response = answers[-1] if answers else ""
        elif "messages" in rec and _messages_ok(rec["messages"]):
            msgs = rec["messages"]
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            prompt, response = (msgs, "") if last is None else (msgs[:last], msgs[last]["content"])
        else:
            problems.append(
                f"{where}: no prompt_messages (or messages) list; eval-data rows look like "
                '{"prompt_messages": [{"role": "user", "content": "..."}], "response": "..."}'
            )
            continue
        if not _messages_ok(prompt) or not prompt:
            problems.append(f"{where}: prompt_messages must be a non-empty list of {{role, content}} strings")
            continue
        if response is not None and not isinstance(response, str):
            problems.append(f"{where}: response must be a string")
            continue
        rows.append({**rec, "prompt_messages": prompt, "response": response or ""})
    if problems:
        raise ValueError(
            "\n".join(problems[:20]) + (f"\n... and {len(problems) - 20} more" if len(problems) > 20 else "")
        )
    if not rows:
        raise ValueError(f"prompt_conf.data.path: {path} has no rows")
    return rows


def _model_load_kwargs(model_args: dict[str, Any]) -> dict[str, Any]:
    """from_pretrained keyword arguments as the Silogen engine passes them: ``torch_dtype`` is the
    old name of ``dtype``; ``device_map`` defaults to auto."""
    import torch

    kwargs = dict(model_args)
    if "torch_dtype" in kwargs:
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    kwargs.setdefault("device_map", "auto")
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(
                f"model_conf.model_args.dtype {dtype!r} is not a "
                "torch dtype; use auto, bfloat16, float16 or float32"
            )
        kwargs["dtype"] = getattr(torch, dtype)
    return kwargs


def generation_defaults(hf_gen_params: dict[str, Any], tok) -> dict[str, Any]:
    """The Silogen engine's generation defaults, filled into ``hf_gen_params`` (in place)."""
    eos = [i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("</s>")) if i is not None]
    for key, value in {
        "eos_token_id": eos,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "max_length": 2048,
        "max_new_tokens": 512,
    }.items():
        hf_gen_params.setdefault(key, value)
    return hf_gen_params


def generate_silogen(cfg: SilogenGenerationConfig, quant_given: bool = True) -> list[dict[str, Any]]:
    """Generate as the Silogen engine's ``generate`` does: one prompt at a time, the prompt
    truncated to ``max_length - max_new_tokens`` tokens, and its output records."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_engine.modeling import quantization_config

    mc = cfg.model_conf
    tok_path = mc.tokenizer or mc.adapter or mc.model
    tok = AutoTokenizer.from_pretrained(tok_path)
    if getattr(tok, "add_eos_token", False):
        try:
            tok.add_eos_token = False
        except (AttributeError, ValueError):
            pass
    gen_params = generation_defaults(cfg.hf_gen_params, tok)
    try:
        gen_conf = transformers.GenerationConfig(**gen_params)
    except (TypeError, ValueError) as err:
        raise ValueError(f"hf_gen_params: {err}") from None
    max_prompt = gen_conf.max_length - gen_conf.max_new_tokens
    if max_prompt <= 0:
        raise ValueError(
            f"hf_gen_params: max_length {gen_conf.max_length} leaves no room for a prompt with "
            f"max_new_tokens {gen_conf.max_new_tokens}; raise max_length"
        )

    if isinstance(cfg.prompt_conf, OpenPromptConf):
        examples = [
            {"txt_input": cfg.prompt_conf.input, "response": "", "dataset": OPEN_PROMPT_DATASET, "id": str(i)}
            for i in range(cfg.prompt_conf.num_samples)
        ]
    else:
        if not tok.chat_template:
            raise ValueError(
                f"model_conf: the tokenizer {tok_path} has no chat template; eval-data prompts are "
                "rendered with it (set model_conf.tokenizer to one that has)"
            )
        examples = []
        for row in load_eval_rows(cfg.prompt_conf.data.path):
            text = tok.apply_chat_template(row["prompt_messages"], tokenize=False, add_generation_prompt=True)
            examples.append({**row, "txt_input": text})

    kwargs = _model_load_kwargs(mc.model_args)
    bnb = quantization_config(cfg)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    try:
        model = AutoModelForCausalLM.from_pretrained(mc.model, **kwargs)
    except ImportError as err:
        if "flash" in str(err).lower():
            raise ValueError(
                f"model_conf.model_args.attn_implementation {mc.model_args.get('attn_implementation')!r} "
                f"is not available here ({err}); use sdpa"
            ) from None
        raise
    if mc.adapter:
        from peft import PeftModel

        fit_embeddings(model, tok, mean_init=False)  # the adapter brings the trained rows
        model = PeftModel.from_pretrained(model, mc.adapter, is_trainable=False)
    model.eval()

    bos = tok.bos_token
    outputs = []
    for i, ex in enumerate(examples):
        text = ex["txt_input"]
        # a template that writes the BOS itself gets no second one
        special = not (bos and text.startswith(bos))
        full = tok(text, add_special_tokens=special)["input_ids"]
        ids = full[:max_prompt] if tok.truncation_side == "right" else full[-max_prompt:]
        if not ids:  # an empty open prompt with a tokenizer that adds no BOS: start from BOS (or EOS)
            ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        input_ids = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gen_conf
            )
        answer = tok.batch_decode(out[:, input_ids.shape[1] :].cpu().numpy(), skip_special_tokens=True)[0]
        raw = tok.batch_decode(out.cpu().numpy(), skip_special_tokens=False)[0]
        outputs.append(
            {
                "dataset": ex.get("dataset", "unknown"),
                "id": ex.get("id", i),
                "prompt": text,
                "answer": answer,
                "correct_answers": [ex["response"]],
                "test_type": "open-ended",
                "data_collection": ex.get("dataset", "unknown"),
                "truncated": len(full) > len(ids),
                "all_text_raw": raw,
            }
        )
        log.info("generated %d / %d", i + 1, len(examples))
    # one shared record of the parameters, as the Silogen engine writes it
    gen_params["quant_conf"] = (
        cfg.quant_conf.model_dump(mode="json", exclude_unset=True) if quant_given else {}
    )
    model_conf = mc.model_dump(mode="json", exclude_unset=True)
    if "model_args" in model_conf:
        model_conf["model_args"] = {
            k: (str(v).removeprefix("torch.") if k == "dtype" else v)
            for k, v in kwargs.items()
            if k != "quantization_config"
        }
    model_conf["tokenizer"] = tok_path
    gen_params["model_conf"] = model_conf
    for item in outputs:
        item["gen_params"] = gen_params
    return outputs


def main(argv: list[str] | None = None) -> int:
    import sys

    parser = argparse.ArgumentParser(prog="generate", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="Generation config YAML (the Silogen engine's or the short format).")
    parser.add_argument("output", help="Where to write the YAML list of answers.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        try:
            text = Path(args.config).read_text(encoding="utf-8")
            data = safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{args.config}:{mark.line + 1}" if mark else args.config
            raise GenerationConfigError(
                args.config, [f"{where}: not valid YAML: {getattr(err, 'problem', err)}"]
            ) from None
        cfg = parse_generation_config(data, text, args.config)
        if isinstance(cfg, SilogenGenerationConfig):
            results = generate_silogen(cfg, quant_given="quant_conf" in data)
            dumped = yaml.dump(results, sort_keys=False, Dumper=yaml.SafeDumper)
        else:
            results = generate(cfg)
            dumped = yaml.safe_dump(results, sort_keys=False, allow_unicode=True)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    Path(args.output).write_text(dumped)
    print(f"{len(results)} answers written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
