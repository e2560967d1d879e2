"""Restart-and-verify: rescue a cut stream on a candidate that cannot take a prefill.

When a committed stream breaks on a chain that continues (`on_stream_failure: continue`)
and the next candidate lacks the `prefill` capability, dispatch restarts the answer there
with the client's original request and puts a `Verifier` between that attempt's
translator and the client. Every piece of the new answer's text is compared with the
text the client already has, and dropped: the client has it. Once the new answer has
reproduced all of it, the rest of that piece and everything after go to the client as
they arrive, so the client sees one answer. Anything else (a different text, a tool call
or refusal, an end before the whole text came back, or not reproducing it within the
time bound) is a `diverged` failure, and nothing of the new answer has reached the
client: dispatch moves on to the next candidate, or ends the stream with the error event.

It helps when the fallback answers the request deterministically (temperature 0, a
seed, a cached answer); a model sampling at temperature > 0 will almost always diverge.
It costs the regenerated text (dispatch records it as wasted) and the time to regenerate
it, during which the client sees nothing.

Bounded: only text of at most `MAX_CHARS` is verified (longer, the candidate is skipped:
regenerating it costs too much and takes too long), and the new answer must have
reproduced it by `deadline` (checked as its events arrive; a silent upstream is cut off
by the idle timer as for any attempt). Nothing of the new answer is held: the text the
client already has is the only thing kept, and continuation keeps it anyway.

Before verification the payloads are decoded (once each, bounded by the above); after
it, the feed is the translator's own with one check in front. Pure: no I/O, no clock of
its own. Imports errors only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import orjson

from .errors import FailureClass, UpstreamFailure

MAX_CHARS = 16_000      # about 4,000 tokens: the most text a restart regenerates to rescue a stream

Feed = Callable[[str | None, bytes], Sequence[bytes]]


class Verifier:
    """Holds a restarted answer back until it has reproduced `sent`, then lets it through."""

    __slots__ = ("sent", "position", "deadline", "clock", "verified")

    def __init__(self, sent: str, deadline: float, clock: Callable[[], float]) -> None:
        self.sent = sent
        self.position = 0               # characters of `sent` the new answer has reproduced
        self.deadline = deadline
        self.clock = clock
        self.verified = False

    def wrap(self, feed: Feed) -> Feed:
        """The translator's `feed`, filtered until the new answer has caught up."""
        def verifying(name: str | None, data: bytes) -> Sequence[bytes]:
            payloads = feed(name, data)
            if self.verified:
                return payloads
            if self.clock() > self.deadline:
                raise diverged(f"did not reproduce the {len(self.sent)} characters already sent in time")
            return [kept for payload in payloads if (kept := self._check(payload)) is not None]
        return verifying

    def shortfall(self) -> UpstreamFailure:
        """Why a new answer that ended before it was verified does not count."""
        return diverged(f"ended after reproducing {self.position} of the {len(self.sent)} characters already sent")

    def _check(self, payload: bytes) -> bytes | None:
        """One payload before verification: None to drop it, or what to send on."""
        if self.verified:
            return payload
        chunk = orjson.loads(payload)
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not choices:
            return None                     # usage alone: nothing the client is owed yet
        send = False
        for choice in choices:
            delta = choice.get("delta") or {}
            if delta.get("tool_calls") or delta.get("function_call") or delta.get("refusal"):
                raise diverged("answered with a tool call or a refusal instead of the text already sent")
            content = delta.get("content")
            if content and not self.verified:
                delta["content"] = self._reproduce(content)
                send = self.verified and bool(delta["content"])
            elif content:
                send = True
            if choice.get("finish_reason"):
                if not self.verified:
                    raise self.shortfall()
                send = True
        return orjson.dumps(chunk) if send else None

    def _reproduce(self, content: str) -> str:
        """Match `content` against the text already sent; returns the part beyond it."""
        start = self.position
        expected = self.sent[start:start + len(content)]
        if not content.startswith(expected):
            raise diverged(f"differs from the text already sent at character {start + _common(content, expected)}")
        self.position = start + len(expected)
        if self.position < len(self.sent):
            return ""
        self.verified = True
        return content[len(expected):]


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def diverged(message: str) -> UpstreamFailure:
    return UpstreamFailure(FailureClass.DIVERGED, f"the restarted answer {message}")
