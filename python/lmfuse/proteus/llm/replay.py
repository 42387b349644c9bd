"""A backend that replays scripted replies: for tests, and to replay the LLM decisions recorded in
a run log (``ReplayBackend.from_run_log``)."""

from __future__ import annotations

import json
from pathlib import Path

from .backend import LLMError, check_messages


class ReplayBackend:
    """Returns ``replies`` in order, one per ``chat`` call (a dict or list is sent as its JSON
    text; an ``Exception`` instance is raised instead). ``calls`` records every request's
    messages and schema. Running out of replies raises :class:`LLMError`; ``cycle=True`` starts
    over instead."""

    def __init__(self, replies, *, name: str = "replay", cycle: bool = False):
        if isinstance(replies, (str, bytes, dict)) or not hasattr(replies, "__iter__"):
            raise TypeError(f"replies must be a list of str/dict/Exception, got {type(replies).__name__}")
        self.replies = list(replies)
        self.name, self.cycle = name, cycle
        self.calls: list[dict] = []
        self._next = 0

    def chat(self, messages: list[dict], *, schema: dict | None = None, max_tokens: int = 512,
             temperature: float = 0.0, seed: int | None = None) -> str:
        self.calls.append({"messages": check_messages(messages), "schema": schema})
        if self._next >= len(self.replies):
            if not (self.cycle and self.replies):
                raise LLMError(f"replay backend ran out of replies after {len(self.replies)}")
            self._next = 0
        reply = self.replies[self._next]
        self._next += 1
        if isinstance(reply, BaseException):
            raise reply
        return reply if isinstance(reply, str) else json.dumps(reply)

    @classmethod
    def from_run_log(cls, path) -> "ReplayBackend":
        """The replies recorded (``"event": "llm"`` lines) in a run's ``run_log.jsonl``."""
        path = Path(path)
        if path.is_dir():
            path = path / "run_log.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"run log not found: {path}")
        replies = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e})") from None
                if rec.get("event") == "llm" and rec.get("reply") is not None:
                    replies.append(rec["reply"])
        return cls(replies, name="replay:" + path.parent.name)
