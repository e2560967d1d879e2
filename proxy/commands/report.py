"""`llm-proxy report`: weekly cost, fallback rate, quality and latency from decision logs.

Reads the JSON lines the decision log writes (files, or standard input when none are
given), joins feedback records to their requests by `request_id`, and summarises each
ISO week (UTC) overall and per tier, per served model and per rule:

  requests       decision records in the group
  avg_cost_usd   cost_usd summed (wasted attempts included) / requests
  fallback_rate  requests with more than one attempt / requests that reached an upstream
  quality        mean feedback score (a request scored twice counts once, its latest score),
                 with their number
  p50/p99        duration_ms and ttft_ms of requests that ended ok (nearest-rank percentiles)

Lines that are not records (log noise, a torn last line) are skipped and counted.
`--html FILE` writes the same report as a page with charts (report_html). Imports nothing
from the package but the decision record's field names.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from .report_html import render

DIMENSIONS = ("tier", "model", "rule")
DAY_S = 86400
TOP_REASONS = 12            # skip reasons the HTML report charts
CLIENT_DISCONNECTED = "client_disconnected"     # the decision record's value (proxy.decisions)
_SINCE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float) -> float:
    """'7d', '12h', '2w' (before now) or an ISO date/time (UTC) -> epoch seconds."""
    match = _SINCE.match(text.strip())
    if match:
        return now - float(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--since takes 7d, 12h, 2w or an ISO date, not '{text}'") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def record_time(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
        return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()
    return None


def iso_week(epoch: float) -> str:
    year, week, _ = dt.datetime.fromtimestamp(epoch, dt.UTC).isocalendar()
    return f"{year}-W{week:02d}"


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least p% of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class Group:
    requests: int = 0
    costs: list[float] = field(default_factory=list)
    wasted: list[float] = field(default_factory=list)
    routed: int = 0                 # reached at least one upstream attempt
    fell_back: int = 0
    ok: int = 0
    scores: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        self.requests += 1
        self.costs.append(float(record.get("cost_usd") or 0.0))
        self.wasted.append(float(record.get("wasted_cost_usd") or 0.0))
        attempts = len(record.get("attempts") or ())
        self.routed += attempts > 0
        self.fell_back += attempts > 1
        if record.get("outcome") == "ok":
            self.ok += 1
            if isinstance(record.get("duration_ms"), (int, float)):
                self.durations.append(float(record["duration_ms"]))
            if isinstance(record.get("ttft_ms"), (int, float)):
                self.ttfts.append(float(record["ttft_ms"]))

    def summary(self) -> dict[str, Any]:
        # fsum: exactly rounded, so the figures do not depend on the order of the lines
        cost = math.fsum(self.costs)
        return {
            "requests": self.requests,
            "ok": self.ok,
            "cost_usd": cost,
            "wasted_cost_usd": math.fsum(self.wasted),
            "avg_cost_usd": cost / self.requests if self.requests else None,
            "fallback_rate": self.fell_back / self.routed if self.routed else None,
            "quality": math.fsum(self.scores) / len(self.scores) if self.scores else None,
            "feedback": len(self.scores),
            "latency_p50_ms": percentile(self.durations, 50),
            "latency_p99_ms": percentile(self.durations, 99),
            "ttft_p50_ms": percentile(self.ttfts, 50),
            "ttft_p99_ms": percentile(self.ttfts, 99),
        }


@dataclass
class Week:
    overall: Group = field(default_factory=Group)
    by: dict[str, dict[str, Group]] = field(default_factory=lambda: {d: {} for d in DIMENSIONS})

    def groups(self, labels: dict[str, str]) -> Iterator[Group]:
        yield self.overall
        for dimension in DIMENSIONS:
            yield self.by[dimension].setdefault(labels[dimension], Group())


def _labels(record: dict[str, Any], model_field: str) -> dict[str, str]:
    return {"tier": str(record.get("tier") or "none"), "model": str(record.get(model_field) or "none"),
            "rule": str(record.get("rule") or "none")}


def read_records(streams: Iterable[IO[bytes]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(decisions, feedback, skipped lines) from JSON-lines streams."""
    decisions: list[dict[str, Any]] = []
    feedback: list[dict[str, Any]] = []
    skipped = 0
    for stream in streams:
        for line in stream:
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                skipped += 1
                continue
            kind = record.get("type", "decision") if isinstance(record, dict) else None
            if kind == "decision" and "request_id" in record and "outcome" in record:
                decisions.append(record)
            elif kind == "feedback" and "request_id" in record and isinstance(record.get("score"), (int, float)):
                feedback.append(record)
            else:
                skipped += 1
    return decisions, feedback, skipped


def latest_scores(feedback: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One score per request, its latest: re-scoring corrects a score, it must not add weight."""
    latest: dict[str, dict[str, Any]] = {}
    for item in feedback:
        rid = str(item["request_id"])
        seen = latest.get(rid)
        if seen is None or (record_time(item.get("time")) or 0.0) >= (record_time(seen.get("time")) or 0.0):
            latest[rid] = item
    return list(latest.values())


def summarise(decisions: list[dict[str, Any]], feedback: list[dict[str, Any]], since: float | None = None
              ) -> dict[str, Any]:
    weeks: dict[str, Week] = {}
    joined: dict[str, tuple[str, dict[str, str]]] = {}      # request_id -> (week, labels)
    for record in decisions:
        when = record_time(record.get("time"))
        if when is None or (since is not None and when < since):
            continue
        week, labels = iso_week(when), _labels(record, "served_model")
        joined[str(record["request_id"])] = (week, labels)
        for group in weeks.setdefault(week, Week()).groups(labels):
            group.add(record)
    for item in latest_scores(feedback):
        found = joined.get(str(item["request_id"]))
        if found is None:                   # its request is outside these logs: use the feedback's own fields
            when = record_time(item.get("time"))
            if when is None or (since is not None and when < since):
                continue
            found = (iso_week(when), _labels(item, "model"))
        week, labels = found
        for group in weeks.setdefault(week, Week()).groups(labels):
            group.scores.append(float(item["score"]))
    return {"weeks": [
        {"week": name, "all": w.overall.summary(),
         **{d: {k: g.summary() for k, g in sorted(w.by[d].items())} for d in DIMENSIONS}}
        for name, w in sorted(weeks.items())
    ]}


def _day(epoch: float) -> int:
    return int(epoch // DAY_S * DAY_S)


def skip_reasons(decisions: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """The most common reasons a candidate was passed over, most common first."""
    counts: Counter[str] = Counter()
    for record in decisions:
        for skip in record.get("skipped") or ():
            reason = str(skip.get("reason") or "unknown") if isinstance(skip, dict) else "unknown"
            counts["skipped: " + reason.partition(":")[0]] += 1
        for attempt in record.get("attempts") or ():       # a client that left is no fault of the attempt's
            if isinstance(attempt, dict) and attempt.get("failure") not in (None, CLIENT_DISCONNECTED):
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


# ------------------------------------------------------------------ the terminal table

COLUMNS = ("requests", "avg cost $", "fallback", "quality (n)", "p50 ms", "p99 ms", "ttft p50", "ttft p99")


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def row_cells(s: dict[str, Any]) -> list[str]:
    return [
        str(s["requests"]),
        _num(s["avg_cost_usd"], 6),
        "-" if s["fallback_rate"] is None else f"{s['fallback_rate'] * 100:.1f}%",
        "-" if s["quality"] is None else f"{s['quality']:.3f} ({s['feedback']})",
        _num(s["latency_p50_ms"]), _num(s["latency_p99_ms"]), _num(s["ttft_p50_ms"]), _num(s["ttft_p99_ms"]),
    ]


def _line(values: list[str], widths: list[int]) -> str:
    return "  ".join(v.ljust(widths[0]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(values))


def week_table(week: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of one week: overall, then per tier, model and rule."""
    rows = [("all", week["all"])] + [(f"{d} {k}", s) for d in DIMENSIONS for k, s in week[d].items()]
    return [f"week {week['week']}", *COLUMNS], [[name, *row_cells(s)] for name, s in rows]


def render_table(report: dict[str, Any]) -> str:
    if not report["weeks"]:
        return "no decision records\n"
    out: list[str] = []
    for week in report["weeks"]:
        header, cells = week_table(week)
        widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
        rule = ["-" * w for w in widths]
        out += [_line(header, widths), _line(rule, widths), *(_line(c, widths) for c in cells), ""]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    since = args.since
    streams: list[IO[bytes]] = []
    try:
        if args.logs:
            for path in args.logs:
                streams.append(sys.stdin.buffer if path == "-" else open(path, "rb"))
        else:
            streams.append(sys.stdin.buffer)
    except OSError as exc:
        print(f"error: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        decisions, feedback, skipped = read_records(streams)
    finally:
        for stream in streams:
            if stream is not sys.stdin.buffer:
                stream.close()
    report = summarise(decisions, feedback, since)
    report["skipped_lines"] = skipped
    if args.html:
        try:
            with open(args.html, "w", encoding="utf-8") as out:
                out.write(render([week_table(w) for w in report["weeks"]], daily(decisions, feedback, since)))
        except OSError as exc:
            print(f"error: cannot write {args.html}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"wrote {args.html}", file=sys.stderr)
        return 0
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render_table(report))
        if skipped:
            print(f"({skipped} lines were not decision or feedback records and were skipped)", file=sys.stderr)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logs", nargs="*", metavar="LOG", help="decision log files (default: standard input)")
    parser.add_argument("--since", type=lambda text: parse_since(text, time.time()),
                        help="only records newer than this: 7d, 12h, 2w, or an ISO date (UTC)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--html", metavar="FILE",
                        help="write a self-contained page with charts (cost per day per tier, cost per request, "
                             "fallback rate, quality per tier, top skip reasons) to FILE")
    parser.set_defaults(func=run)
