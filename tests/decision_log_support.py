"""Shared by the observability tests: read a decision log, wait for its records."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson

from proxy.gateway import Gateway


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def decisions_in(path: Path) -> list[dict[str, Any]]:
    return [r for r in read_lines(path) if r.get("type") == "decision"]


async def settled_records(gateway: Gateway, path: Path, expected: int, timeout: float = 5.0
                          ) -> list[dict[str, Any]]:
    """The decision records once `expected` are written (or the timeout passed), after a short
    extra wait so that a duplicate written late would be seen too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await gateway.decisions.flush()
        if len(decisions_in(path)) >= expected:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    await gateway.decisions.flush()
    return decisions_in(path)
