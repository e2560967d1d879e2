"""`llm-proxy report --html FILE`: the report as one self-contained page with charts.

The page holds everything it needs (the data, uPlot and the drawing script inline), so it
opens from a file, a mail attachment or an artifact store with no network; a
Content-Security-Policy in the page forbids it to load anything at all. Charts, one point
per UTC day:

  cost per day, by tier           cost_usd summed (wasted attempts included)
  average cost per request        over all requests of the day
  fallback rate                   requests with more than one attempt / requests that reached an upstream
  quality score by tier           mean of the latest score of each request scored
  top skip reasons                why candidates were left out of plans (the reason's kind,
                                  such as "context window" or "cost ceiling") and why attempts
                                  failed (their failure class), over the whole period

followed by the weekly table of the text report. The figures are computed by the report
command (`report.daily`); this module only lays them out. Imports the page's static files.
"""

from __future__ import annotations

import html
import re
import time
from typing import Any

import orjson

from ..ops.assets import asset

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(tables: list[tuple[list[str], list[list[str]]]], charts: dict[str, Any],
           generated: float | None = None) -> str:
    """The whole page as one string: the weekly tables (header and rows of text, as the text
    report prints them) and the charts' data (`report.daily`)."""
    data = orjson.dumps(charts).replace(b"<", b"\\u003c").decode()
    weeks = "\n".join(_table(header, rows) for header, rows in tables) or "<p>no decision records</p>"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(generated if generated is not None else time.time()))
    values = {"generated": html.escape(when), "requests": str(charts["requests"]), "weeks": weeks, "data": data,
              "uplot_css": asset("uPlot.min.css").decode(), "report_css": asset("report.css").decode(),
              "uplot_js": asset("uPlot.iife.min.js").decode(), "report_js": asset("report.js").decode()}
    # One pass: what is put in (a tier name a caller chose, say) is never read for placeholders.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], asset("report.html").decode())
