"""Splicing one top-level string value into raw JSON bytes, every other byte as it was.

A native passthrough (the client's own body to an upstream of its own protocol) must send
what the client sent, with only `model` replaced: re-serialising would change whitespace,
escapes and number formats, and an Anthropic thinking block's signature covers its bytes.
Pure: bytes in, bytes out.
"""

from __future__ import annotations

import re

import orjson

# A JSON string, or one structural character: strings are skipped whole by the regex engine, so
# a body of long texts costs a few tokens per block, not a step per byte.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\],]')


class NotFound(ValueError):
    """The body has no top-level string value of that key to replace."""


def spans(raw: bytes, name: bytes = b"model") -> list[tuple[int, int]]:
    """(start, end) of each top-level string value of key `name` in a JSON object's bytes (all of
    them: with a duplicated key, an upstream must not read a value the gateway did not)."""
    found = []
    depth = 0
    key: bytes | None = None            # the top-level key whose value comes next
    expect_key = False
    for token in _TOKEN.finditer(raw):
        first = raw[token.start()]
        if first == 0x22:                                   # a string
            if depth == 1:
                if expect_key:
                    text = token.group()
                    key = orjson.loads(text).encode() if b"\\" in text else text[1:-1]
                    expect_key = False
                elif key == name:
                    found.append(token.span())
        elif first in b"{[":
            depth += 1
            if depth == 1:
                expect_key = first == 0x7B
        elif first in b"}]":
            depth -= 1
        elif first == 0x2C and depth == 1:                  # a comma between top-level members
            expect_key, key = True, None
    if not found:
        raise NotFound(f"no top-level string '{name.decode()}'")
    return found


def replace_string(raw: bytes, name: str, value: str) -> bytes:
    """`raw` with every top-level `name` string set to `value`; every other byte as it was."""
    new = orjson.dumps(value)
    out, last = [], 0
    for start, end in spans(raw, name.encode()):
        out += [raw[last:start], new]
        last = end
    out.append(raw[last:])
    return b"".join(out)
