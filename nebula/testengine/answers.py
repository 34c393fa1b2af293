"""The test engine's answers in vLLM's shapes: whole, or as stream chunks."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

# OpenAI's field for "which backend answered": here the engine's process, so that a
# test behind the router can tell which replica served each request.
FINGERPRINT = f"testengine-{os.getpid()}"


@dataclass
class Answer:
    """One completion's made-up answer, and what it says about itself."""

    chat: bool
    model: str
    words: list[str]
    finish: str
    usage: dict[str, Any]
    rid: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.rid = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:16]
        self.created = int(time.time())

    @property
    def kind(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def envelope(self, choice: dict[str, Any], kind: str) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [choice],
        }

    def whole(self) -> dict[str, Any]:
        text = "".join(self.words)
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}}
            if self.chat
            else {"index": 0, "text": text}
        )
        choice["finish_reason"] = self.finish
        return {**self.envelope(choice, self.kind), "usage": self.usage}

    def chunk(self, delta: str | None, finish_reason: str | None = None) -> dict[str, Any]:
        if self.chat:
            d: dict[str, Any] = {} if delta is None else {"content": delta}
            choice = {"index": 0, "delta": d, "finish_reason": finish_reason}
            return self.envelope(choice, self.kind + ".chunk")
        choice = {"index": 0, "text": delta or "", "finish_reason": finish_reason}
        return self.envelope(choice, self.kind)
