"""Named chat templates with their assistant markers. No torch here.

Every template starts with the BOS token and is tokenized with ``add_special_tokens=False``, the
same way vLLM and ``apply_chat_template`` tokenize a chat, so training and serving see the same
token sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    assistant_start: str  # what the generation prompt adds before an assistant reply
    assistant_end: str  # what closes an assistant reply ("{eos}" = the tokenizer's EOS)
    new_special_tokens: tuple[str, ...] = field(default=())

    def end_marker(self, eos_token: str) -> str:
        return self.assistant_end.replace("{eos}", eos_token)


CHAT_ML = ChatTemplate(
    name="chat-ml",
    jinja=(
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    assistant_start="<|im_start|>assistant\n",
    assistant_end="<|im_end|>",
    new_special_tokens=("<|im_start|>", "<|im_end|>"),
)

LLAMA_3 = ChatTemplate(
    name="llama-3",
    jinja=(
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    assistant_start="<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant_end="<|eot_id|>",
    new_special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)

MISTRAL_WITH_SYSTEM = ChatTemplate(
    name="mistral-with-system",
    jinja=(
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}"
        "{% elif message['role'] == 'user' %}{{ '[INST]' + message['content'] + '[/INST]' }}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    assistant_start="",
    assistant_end="{eos}",
    new_special_tokens=("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"),
)

NAMED_TEMPLATES = {t.name: t for t in (CHAT_ML, LLAMA_3, MISTRAL_WITH_SYSTEM)}
