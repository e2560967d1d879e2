"""The files shipped in proxy/ops/static (package data): the page, its script and style, the
report's script, and uPlot (MIT, from npm `uplot` 1.6.32, `dist/uPlot.iife.min.js`, with its
licence in `uPlot.LICENSE`). Read-only; imports nothing from the package."""

from __future__ import annotations

from importlib import resources


def asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()
