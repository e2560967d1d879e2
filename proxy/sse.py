"""Server-sent events framing: an incremental parser and the encoders. No provider names.

The parser takes bytes as they come off the socket and returns only complete events,
so a frame split across reads is held until its blank line arrives and nothing else is
held. Line endings may be LF, CRLF or CR, and an event's data may span several `data:`
lines (joined with LF), as the SSE spec allows.

It works in linear time however the upstream cuts its bytes: each read is scanned once,
and the reads of an unfinished event are kept as a list and joined once, when the event
ends. One event may hold at most `max_event_bytes`; a larger one raises `EventTooLarge`
(a hostile or broken upstream must not make the gateway buffer without bound).

The encoders always write single-line `data:` frames, so a client's SSE parser (and the
JSON decoder behind it) sees exactly one JSON document per event.
"""

from __future__ import annotations

from typing import NamedTuple


class Event(NamedTuple):
    name: str | None    # the `event:` field, None for the default "message"
    data: bytes         # `data:` lines joined by LF


DONE = b"[DONE]"
DONE_FRAME = b"data: [DONE]\n\n"
MAX_EVENT_BYTES = 8 * 1024 * 1024       # the default cap; real events are a few KB at most


class EventTooLarge(ValueError):
    """An upstream event grew past the parser's cap before its blank line arrived."""


class SSEParser:
    __slots__ = ("_parts", "_size", "_held_cr", "max_event_bytes")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._parts: list[bytes] = []   # the unfinished event, LF line endings only
        self._size = 0
        self._held_cr = False           # the last read ended in CR: maybe half of a CRLF
        self.max_event_bytes = max_event_bytes

    def feed(self, chunk: bytes) -> list[Event]:
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                self._held_cr = True
                chunk = chunk[:-1]
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        parts = self._parts
        if parts and chunk.startswith(b"\n") and parts[-1].endswith(b"\n"):
            # The blank line straddles two reads: the held event ends here.
            parts[-1] = parts[-1][:-1]
            chunk = b"\n\n" + chunk[1:]
        blocks = chunk.split(b"\n\n")
        if len(blocks) == 1:                # no event ends in this read: hold it, within the cap
            if chunk:
                parts.append(chunk)
                self._size += len(chunk)
                if self._size > self.max_event_bytes:
                    self._parts, self._size = [], 0
                    raise EventTooLarge(f"an upstream event exceeded {self.max_event_bytes} bytes")
            return []
        last = blocks.pop()
        if parts:
            parts.append(blocks[0])
            blocks[0] = b"".join(parts)
        self._parts = [last] if last else []
        self._size = len(last)
        events = []
        for block in blocks:
            if len(block) > self.max_event_bytes:
                raise EventTooLarge(f"an upstream event exceeded {self.max_event_bytes} bytes")
            if block.startswith(b"data: ") and b"\n" not in block:
                events.append(Event(None, block[6:]))       # the common one-line frame
                continue
            event = _parse_block(block)
            if event is not None:
                events.append(event)
        if self._size > self.max_event_bytes:
            self._parts, self._size = [], 0
            raise EventTooLarge(f"an upstream event exceeded {self.max_event_bytes} bytes")
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated by a blank line."""
        return b"".join(self._parts)


def _parse_block(block: bytes) -> Event | None:
    name: str | None = None
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    if not data and name is None:
        return None
    return Event(name, b"\n".join(data))


def frame(data: bytes) -> bytes:
    """One `data:` frame. Data joined from several upstream `data:` lines holds LFs; in JSON
    they can only be whitespace between tokens (a string cannot hold a raw LF), so they
    become spaces rather than a line that would end the frame early."""
    if b"\n" in data:
        data = data.replace(b"\n", b" ")
    return b"data: " + data + b"\n\n"


def named_frame(name: str, data: bytes) -> bytes:
    if b"\n" in data:
        data = data.replace(b"\n", b" ")
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"
