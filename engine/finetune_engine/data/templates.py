"""Named chat templates with their assistant markers. No torch here.

The names, the Jinja text, the assistant start/end markers and the special tokens each template
adds are those of the Silogen finetuning engine, so a config naming a template renders and
tokenizes the same conversation the same way (``llama-3`` is this engine's own addition).

Most of these templates do not write the BOS token themselves: training frames every rendered
conversation as BOS + text + EOS (``data/tokenize.py``), the way the Silogen engine's training
tokenizer (``add_bos_token``/``add_eos_token``) does, and the saved tokenizer adds BOS at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    assistant_start: str  # the marker just before an assistant reply (trained with completions only)
    assistant_end: str  # what closes an assistant reply ("{eos}" = the tokenizer's EOS)
    new_special_tokens: tuple[str, ...] = field(default=())

    def end_marker(self, eos_token: str) -> str:
        return self.assistant_end.replace("{eos}", eos_token)


# Mistral-style instructions with a Llama-2-style system block, no generation prompt: a reply
# follows "[/INST]" directly and ends with EOS and a space. Adds no tokens.
MISTRAL_WITH_SYSTEM = ChatTemplate(
    name="mistral-with-system",
    jinja=(
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'system' %}"
        "{{ '<<SYS>>\n' + message['content'] + '\n<</SYS>>\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token + ' ' }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    assistant_start="[/INST]",
    assistant_end="{eos}",
)

CHAT_ML = ChatTemplate(
    name="chat-ml",
    jinja=(
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}"
        "{% endif %}"
    ),
    assistant_start="<|im_start|>assistant\n",
    assistant_end="<|im_end|>",
    new_special_tokens=("<|im_start|>", "<|im_end|>"),
)

# Poro's tags; every turn ends with EOS. <|system|> is deliberately not a special token (as in
# the Silogen engine): it is rare in Poro's data and stays plain text.
PORO = ChatTemplate(
    name="poro",
    jinja=(
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ '<|user|>\n' + message['content'] + eos_token }}"
        "{% elif message['role'] == 'system' %}"
        "{{ '<|system|>\n' + message['content'] + eos_token }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '<|assistant|>\n'  + message['content'] + eos_token }}"
        "{% endif %}"
        "{% if loop.last and add_generation_prompt %}"
        "{{ '<|assistant|>\n' }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    assistant_start="<|assistant|>\n",
    assistant_end="{eos}",
    new_special_tokens=("<|user|>", "<|assistant|>"),
)

# Llama 3.1's headers without its tool/date preamble; message contents are trimmed.
SIMPLIFIED_LLAMA31 = ChatTemplate(
    name="simplified-llama31",
    jinja=(
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        "+ message['content'] | trim + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{%- endif %}"
    ),
    assistant_start="<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant_end="<|eot_id|>",
    new_special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)

# This engine's own: Llama 3 headers, contents untrimmed.
LLAMA_3 = ChatTemplate(
    name="llama-3",
    jinja=(
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
        "+ message['content'] + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    assistant_start="<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant_end="<|eot_id|>",
    new_special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)

NAMED_TEMPLATES = {t.name: t for t in (MISTRAL_WITH_SYSTEM, CHAT_ML, PORO, SIMPLIFIED_LLAMA31, LLAMA_3)}
