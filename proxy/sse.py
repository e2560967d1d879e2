"""Server-sent events framing: an incremental parser and the encoders. No provider names.

The parser takes bytes as they come off the socket and returns only complete events,
so a frame split across reads is held until its blank line arrives and nothing else is
held. Line endings may be LF, CRLF or CR, as the SSE spec allows.
"""

from __future__ import annotations

from typing import NamedTuple


class Event(NamedTuple):
    name: str | None    # the `event:` field, None for the default "message"
    data: bytes         # `data:` lines joined by LF


DONE = b"[DONE]"
DONE_FRAME = b"data: [DONE]\n\n"


class SSEParser:
    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Event]:
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            # Keep a trailing CR: it may be the first half of a CRLF split across reads.
            tail = b"\r" if buffer.endswith(b"\r") else b""
            body = buffer[:-1] if tail else buffer
            buffer = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + tail
        blocks = buffer.split(b"\n\n")
        self._buffer = blocks.pop()
        events = []
        for block in blocks:
            if block.startswith(b"data: ") and b"\n" not in block:
                events.append(Event(None, block[6:]))       # the common one-line frame
                continue
            event = _parse_block(block)
            if event is not None:
                events.append(event)
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated by a blank line."""
        return self._buffer


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
    return b"data: " + data + b"\n\n"


def named_frame(name: str, data: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"
