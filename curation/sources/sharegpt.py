"""ShareGPT / OpenAI "messages" records → LLaVA records, so that the LLaVA checks validate them.

Accepted shape (LlamaFactory's ``sharegpt`` format with ``messages``, and the OpenAI chat layout)::

    {"id": "a1", "images": ["img/1.png"],
     "messages": [{"role": "system", "content": "..."},               # optional, first only
                  {"role": "user", "content": "<image>What is this?"},  # or a list of parts:
                  {"role": "assistant", "content": "A cat."}]}          # [{"type": "image"}, {"type": "text", "text": "..."}]

``from``/``value`` keys and the ``human``/``gpt`` role names are accepted too. Conversion maps message
``i`` to conversation turn ``i``, and the reasons of the LLaVA checks are re-worded back to this format's
field names (``conversations[1].from`` → ``messages[1].role``), so a quarantine row names the field the
user has to fix.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["ShareGPTError", "to_llava_record", "translate_reason"]

ROLES: dict[str, str] = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt", "system": "system"}
IMAGE_PART_TYPES = ("image", "image_url")


class ShareGPTError(ValueError):
    """A record that cannot be converted; the message starts with the field name."""


def to_llava_record(record: Any) -> dict[str, Any]:
    """The LLaVA form of one messages record. Raises ``ShareGPTError`` for problems only this format has."""
    if not isinstance(record, dict):
        return record  # the LLaVA checks reject it with the right message
    if "messages" not in record:
        raise ShareGPTError("messages: missing; expected a list of {role, content} messages")
    messages = record["messages"]
    if not isinstance(messages, list):
        raise ShareGPTError(f"messages: expected a list of messages, got {type(messages).__name__}")
    conversations = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ShareGPTError(f"messages[{i}]: expected an object with 'role' and 'content'")
        role = message.get("role", message.get("from"))
        if role is None:
            raise ShareGPTError(f"messages[{i}].role: missing; expected user or assistant")
        if role not in ROLES:
            raise ShareGPTError(f"messages[{i}].role: unknown role {role!r} (expected system/user/assistant)")
        content = message.get("content", message.get("value"))
        if content is None:
            raise ShareGPTError(f"messages[{i}].content: missing; expected the message's text")
        conversations.append({"from": ROLES[role], "value": _content_text(content, i)})
    converted = {key: value for key, value in record.items() if key not in ("messages", "images", "image")}
    converted["conversations"] = conversations
    images = record.get("images", record.get("image"))
    if images is not None:
        converted["image"] = images
    return converted


def _content_text(content: Any, index: int) -> str:
    """A message's content as LLaVA text: a string as is; a list of parts joined, ``<image>`` per image part."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ShareGPTError(f"messages[{index}].content: expected a string or a list of parts, got {type(content).__name__}")
    pieces = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in IMAGE_PART_TYPES:
            pieces.append("<image>")
        else:
            raise ShareGPTError(
                f"messages[{index}].content[{k}]: expected {{'type': 'text', 'text': ...}} or {{'type': 'image'}}"
            )
    return "\n".join(pieces)


_FIELD_NAMES = (
    (re.compile(r"\bconversations\[(\d+)\]\.from\b"), r"messages[\1].role"),
    (re.compile(r"\bconversations\[(\d+)\]\.value\b"), r"messages[\1].content"),
    (re.compile(r"\bconversations\b"), "messages"),
    (re.compile(r"^image(\[\d+\])?:"), r"images\1:"),
    (re.compile(r"'image' lists"), "'images' lists"),
)


def translate_reason(reason: str) -> str:
    """A LLaVA check's reason re-worded with this format's field names."""
    for pattern, replacement in _FIELD_NAMES:
        reason = pattern.sub(replacement, reason)
    return reason
