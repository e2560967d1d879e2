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

followed by the weekly table of the text report. Imports the text report and the page's
static files only.
"""

from __future__ import annotations

import html
import math
import re
import time
from collections import Counter, defaultdict
from typing import Any

import orjson

from ..ops.assets import asset
from .report import COLUMNS, DIMENSIONS, latest_scores, record_time, row_cells

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
DAY_S = 86400
TOP_REASONS = 12


def _day(epoch: float) -> int:
    return int(epoch // DAY_S * DAY_S)


def skip_reasons(decisions: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """The most common reasons a candidate was passed over, most common first."""
    counts: Counter[str] = Counter()
    for record in decisions:
        for skip in record.get("skipped") or ():
            reason = str(skip.get("reason") or "unknown") if isinstance(skip, dict) else "unknown"
            counts["skipped: " + reason.partition(":")[0]] += 1
        for attempt in record.get("attempts") or ():
            if isinstance(attempt, dict) and attempt.get("failure"):
                counts["attempt failed: " + str(attempt["failure"])] += 1
    return counts.most_common(TOP_REASONS)


def daily(decisions: list[dict[str, Any]], feedback: list[dict[str, Any]], since: float | None
          ) -> dict[str, Any]:
    """The charts' data: one point per day that has records, per tier where it applies."""
    requests: Counter[int] = Counter()
    routed: Counter[int] = Counter()
    fell_back: Counter[int] = Counter()
    cost: dict[int, list[float]] = defaultdict(list)
    tier_cost: dict[tuple[int, str], list[float]] = defaultdict(list)
    scores: dict[tuple[int, str], list[float]] = defaultdict(list)
    joined: dict[str, tuple[int, str]] = {}
    kept = []
    for record in decisions:
        when = record_time(record.get("time"))
        if when is None or (since is not None and when < since):
            continue
        kept.append(record)
        day, tier = _day(when), str(record.get("tier") or "none")
        joined[str(record["request_id"])] = (day, tier)
        requests[day] += 1
        attempts = len(record.get("attempts") or ())
        routed[day] += attempts > 0
        fell_back[day] += attempts > 1
        spent = float(record.get("cost_usd") or 0.0)
        cost[day].append(spent)
        tier_cost[(day, tier)].append(spent)
    for item in latest_scores(feedback):
        found = joined.get(str(item["request_id"]))
        if found is None:
            when = record_time(item.get("time"))
            if when is None or (since is not None and when < since):
                continue
            found = (_day(when), str(item.get("tier") or "none"))
        scores[found].append(float(item["score"]))
    days = sorted(set(requests) | {day for day, _ in scores})
    tiers = sorted({tier for _, tier in tier_cost} | {tier for _, tier in scores})
    return {
        "days": days,
        "tiers": tiers,
        "cost_by_tier": {t: [math.fsum(tier_cost.get((d, t), ())) for d in days] for t in tiers},
        "avg_cost": [math.fsum(cost[d]) / requests[d] if requests[d] else None for d in days],
        "fallback_rate": [fell_back[d] / routed[d] if routed[d] else None for d in days],
        "quality_by_tier": {t: [math.fsum(s) / len(s) if (s := scores.get((d, t))) else None for d in days]
                            for t in tiers},
        "skip_reasons": skip_reasons(kept),
        "requests": sum(requests.values()),
    }


def _week_table(week: dict[str, Any]) -> str:
    rows = [("all", week["all"])] + [(f"{d} {k}", s) for d in DIMENSIONS for k, s in week[d].items()]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in (f"week {week['week']}", *COLUMNS))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in (name, *row_cells(s))) + "</tr>"
                   for name, s in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(report: dict[str, Any], charts: dict[str, Any], generated: float | None = None) -> str:
    """The whole page as one string."""
    data = orjson.dumps(charts).replace(b"<", b"\\u003c").decode()
    weeks = "\n".join(_week_table(w) for w in report["weeks"]) or "<p>no decision records</p>"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(generated if generated is not None else time.time()))
    values = {"generated": html.escape(when), "requests": str(charts["requests"]), "weeks": weeks, "data": data,
              "uplot_css": asset("uPlot.min.css").decode(), "report_css": asset("report.css").decode(),
              "uplot_js": asset("uPlot.iife.min.js").decode(), "report_js": asset("report.js").decode()}
    # One pass: what is put in (a tier name a caller chose, say) is never read for placeholders.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], asset("report.html").decode())
