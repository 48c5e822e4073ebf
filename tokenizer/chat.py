"""The chat template shared by training (loss mask) and generation, in Python and in jinja.

ChatML-like, one BOS at the start of the conversation:

    <s><|im_start|>system\\n{content}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n            (+ "<|im_start|>assistant\\n" to generate)

The loss mask is 1 on an assistant message's content and its `<|im_end|>`, 0 elsewhere.

Marker text typed inside a message (`<|im_start|>`, `<|im_end|>`) must not become a control token:
sentencepiece matches user-defined symbols anywhere, and a Hugging Face tokenizer sees only the rendered
string. Both sides therefore escape it the same way: a SEGMENT_BREAK (U+FDD0, a Unicode noncharacter) is
inserted after its "<", and every tokenizer here treats U+FDD0 as an invisible boundary — the text on each
side is encoded separately and the U+FDD0 itself is dropped. "<" and "|im_start|>" then encode as
ordinary pieces, and the decoded text is exactly what the user typed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from common.errors import UserError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_TOKENS = (IM_START, IM_END)
ROLES = ("system", "user", "assistant")
# A Unicode noncharacter: "permanently reserved for internal use", never meant to appear in text that is
# exchanged. Our encoder and the exported HF pipeline both split on it and drop it (see the module docstring).
SEGMENT_BREAK = "\ufdd0"


def escape_content(content: str) -> str:
    """Break every chat-marker string in `content` so that no tokenizer here can match it as a token.

    U+FDD0 typed by the user is removed first: only the escape may cut the content into segments (a segment
    alone could otherwise spell a special piece such as "<s>").
    """
    content = content.replace(SEGMENT_BREAK, "")
    for marker in CHAT_TOKENS:
        if marker in content:
            content = content.replace(marker, marker[0] + SEGMENT_BREAK + marker[1:])
    return content


def check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """One clear error for a malformed conversation (unknown role, content that is not a string)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise UserError(
            f"a conversation must be a list of {{'role', 'content'}} messages, got {type(messages).__name__}"
        )
    if not messages:
        raise UserError("empty conversation: give at least one message (transformers refuses it too)")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise UserError(f"message {i}: expected a mapping with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise UserError(f"message {i}: role {m['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise UserError(f"message {i}: content must be a string, got {type(m['content']).__name__}")


def render_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The text the jinja template renders (without BOS): what `encode_chat` encodes, segment by segment."""
    check_messages(messages)
    parts = [f"{IM_START}{m['role']}\n{escape_content(m['content'])}{IM_END}\n" for m in messages]
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def _jinja_literal(s: str) -> str:
    """A jinja string literal for `s` (escapes spelled out so the template file stays plain ASCII)."""
    out = []
    for ch in s:
        if ch in "'\\":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) > 126:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "'" + "".join(out) + "'"


def jinja_template() -> str:
    """The same template for `transformers` (`tokenizer.chat_template`).

    BOS is written as `bos_token`: `apply_chat_template` tokenizes with add_special_tokens=False, and the
    export's pre-tokenizer isolates "<s>" before "<|im_start|>", which the whole-piece rule maps to BOS.
    """
    roles = "[" + ", ".join(_jinja_literal(r) for r in ROLES) + "]"
    escape = f" | replace({_jinja_literal(SEGMENT_BREAK)}, '')" + "".join(
        f" | replace({_jinja_literal(m)}, {_jinja_literal(m[0] + SEGMENT_BREAK + m[1:])})"
        for m in CHAT_TOKENS
    )
    return (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        f"{{%- if message['role'] not in {roles} -%}}"
        "{{- raise_exception('role ' + message['role'] + ' is not one of system, user, assistant') -}}"
        "{%- endif -%}"
        f"{{{{- {_jinja_literal(IM_START)} + message['role'] + '\\n' + (message['content']{escape})"
        f" + {_jinja_literal(IM_END)} + '\\n' -}}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {_jinja_literal(IM_START + 'assistant' + chr(10))} -}}}}{{%- endif -%}}"
    )
