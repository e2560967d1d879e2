"""`llm-proxy report` prints exactly the weekly figures this test computes on its own.

The log is generated with the gateway's own record types (Decision.to_json), spans three
ISO weeks, and holds feedback records and lines that are not records at all.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.decisions import AttemptRecord, Decision

from .conftest import ROOT

WEEK_STARTS = [dt.datetime(2026, 1, 5, tzinfo=dt.UTC), dt.datetime(2026, 1, 12, tzinfo=dt.UTC),
               dt.datetime(2026, 1, 19, tzinfo=dt.UTC)]         # Mondays of 2026-W02, W03, W04
TIERS, MODELS, RULES = ("free", "standard", "premium"), ("alpha", "beta", "gamma"), ("short", "code", "default")
OUTCOMES = ("ok", "ok", "ok", "ok", "stream_error", "upstream_failed", "bad_request")
SKIPS = ("context window: needs ~200000 tokens, model has 128000", "capability: tools need 'tools'",
         "cost ceiling: worst case $0.020000 exceeds $0.01", "context window: max_tokens 9000 exceeds the output limit")


def _generate(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    decisions, feedback = [], []
    for i in range(90):
        start = WEEK_STARTS[i % 3]
        when = start + dt.timedelta(seconds=rng.randrange(7 * 86400))
        outcome = rng.choice(OUTCOMES)
        d = Decision(f"req-{i}", 0.0, time=when.timestamp())
        d.tier, d.rule = rng.choice(TIERS), rng.choice(RULES)
        d.stream = rng.random() < 0.5
        if outcome != "bad_request":
            for _ in range(rng.choice((1, 1, 2, 3))):
                d.attempts.append(AttemptRecord(rng.choice(MODELS), "x/y/0", "p", 0.0))
            d.served_model = d.attempts[-1].model if outcome != "upstream_failed" else None
            d.cost_usd = round(rng.uniform(0.0001, 0.02), 6) if outcome != "upstream_failed" else 0.0
        d.outcome = outcome
        if i % 3 == 0:                                      # a plan that left a model out, and why
            d.skipped = [{"model": "gamma", "reason": SKIPS[i % len(SKIPS)]}]
        d.duration_ms = round(rng.uniform(20, 3000), 3)
        d.ttft_ms = round(rng.uniform(5, 400), 3) if d.stream and outcome == "ok" else None
        decisions.append(d.to_json())
        if rng.random() < 0.4:
            feedback.append({"type": "feedback", "time": (when + dt.timedelta(minutes=5)).isoformat(),
                             "request_id": d.request_id, "score": round(rng.random(), 2), "tier": d.tier,
                             "model": d.served_model, "rule": d.rule, "key": None})
    return decisions, feedback


def _nearest_rank(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[math.ceil(p / 100 * len(ordered)) - 1]


def _expected(decisions: list[dict[str, Any]], feedback: list[dict[str, Any]], since: float | None
              ) -> dict[tuple[str, str], dict[str, Any]]:
    """(week, row name) -> figures, computed here without the report module (exact sums: fsum)."""
    rows: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    names: dict[str, list[str]] = {}
    for d in decisions:
        when = dt.datetime.fromisoformat(d["time"])
        if since is not None and when.timestamp() < since:
            continue
        year, week, _ = when.isocalendar()
        w = f"{year}-W{week:02d}"
        names[d["request_id"]] = [w, "all", f"tier {d['tier']}", f"model {d['served_model'] or 'none'}",
                                  f"rule {d['rule']}"]
        for name in names[d["request_id"]][1:]:
            rows[(w, name)].append(d)
    for f in feedback:
        if f["request_id"] in names:
            w, *row_names = names[f["request_id"]]
            for name in row_names:
                scores[(w, name)].append(f["score"])
    out = {}
    for key, group in rows.items():
        routed = [d for d in group if d["attempts"]]
        ok = [d for d in group if d["outcome"] == "ok"]
        got = scores.get(key, [])
        out[key] = {
            "requests": len(group),
            "avg_cost_usd": math.fsum(d["cost_usd"] for d in group) / len(group),
            "fallback_rate": sum(len(d["attempts"]) > 1 for d in routed) / len(routed) if routed else None,
            "quality": math.fsum(got) / len(got) if got else None, "feedback": len(got),
            "latency_p50_ms": _nearest_rank([d["duration_ms"] for d in ok], 50),
            "latency_p99_ms": _nearest_rank([d["duration_ms"] for d in ok], 99),
            "ttft_p50_ms": _nearest_rank([d["ttft_ms"] for d in ok if d["ttft_ms"] is not None], 50),
            "ttft_p99_ms": _nearest_rank([d["ttft_ms"] for d in ok if d["ttft_ms"] is not None], 99),
        }
    return out


async def _series_drawn(page: Any) -> list[tuple[int, float | None]]:
    """For each chart: how many pixels its first series colours (#2f6fde; axes and grid are
    grey, so an empty chart has none), and their mean position across the canvas (0-1)."""
    return [tuple(spot) for spot in await page.evaluate(
        """() => Array.from(document.querySelectorAll('.chart canvas')).map((c) => {
            const pixels = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let count = 0, sum = 0;
            for (let i = 0; i < pixels.length; i += 4) {
                if (Math.abs(pixels[i] - 47) < 30 && Math.abs(pixels[i + 1] - 111) < 30
                    && Math.abs(pixels[i + 2] - 222) < 30 && pixels[i + 3] > 128) {
                    count++;
                    sum += (i / 4) % c.width;
                }
            }
            return [count, count ? sum / count / c.width : null];
        })""")]


def _report(*args: str, stdin: bytes | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "proxy", "report", *args], cwd=ROOT, input=stdin,
                          capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


@pytest.fixture
def log(tmp_path: Path) -> tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]:
    decisions, feedback = _generate(random.Random(20260105))
    lines = [orjson.dumps(r) for r in decisions + feedback]
    random.Random(3).shuffle(lines)                          # feedback may come before its request
    lines[10:10] = [b'{"level": "info", "msg": "listening"}', b"not json at all", b"[1, 2]"]
    path = tmp_path / "decisions.jsonl"
    path.write_bytes(b"\n".join(lines) + b'\n{"type": "decision", "request_id": "torn')   # a torn last line
    return path, decisions, feedback


def test_json_report_matches_independent_computation(log) -> None:
    path, decisions, feedback = log
    report = orjson.loads(_report(str(path), "--json"))
    expected = _expected(decisions, feedback, None)
    assert report["skipped_lines"] == 4
    assert [w["week"] for w in report["weeks"]] == ["2026-W02", "2026-W03", "2026-W04"]
    seen = set()
    for week in report["weeks"]:
        rows = {"all": week["all"], **{f"{dim} {k}": v for dim in ("tier", "model", "rule")
                                       for k, v in week[dim].items()}}
        for name, got in rows.items():
            want = expected[(week["week"], name)]
            seen.add((week["week"], name))
            for field, value in want.items():
                if value is None:
                    assert got[field] is None, (week["week"], name, field)
                else:
                    assert got[field] == pytest.approx(value, rel=1e-12, abs=1e-15), (week["week"], name, field)
    assert seen == set(expected)


def test_table_prints_the_same_figures_and_reads_stdin(log) -> None:
    path, decisions, feedback = log
    table = _report(stdin=path.read_bytes())
    expected = _expected(decisions, feedback, None)
    week = None
    checked = 0
    for line in table.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0].startswith("week "):
            week = cells[0].removeprefix("week ")
            continue
        if not line.strip() or set(line.strip()) <= {"-", " "}:
            continue
        want = expected[(week, cells[0])]
        fmt = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"      # noqa: E731
        assert cells[1:] == [
            str(want["requests"]), fmt(want["avg_cost_usd"], 6),
            "-" if want["fallback_rate"] is None else f"{want['fallback_rate'] * 100:.1f}%",
            "-" if want["quality"] is None else f"{want['quality']:.3f} ({want['feedback']})",
            fmt(want["latency_p50_ms"]), fmt(want["latency_p99_ms"]), fmt(want["ttft_p50_ms"]),
            fmt(want["ttft_p99_ms"]),
        ], (week, cells[0])
        checked += 1
    assert checked == len(expected)


def test_since_leaves_older_weeks_out(log) -> None:
    path, decisions, feedback = log
    report = orjson.loads(_report(str(path), "--json", "--since", "2026-01-12"))
    assert [w["week"] for w in report["weeks"]] == ["2026-W03", "2026-W04"]
    cutoff = dt.datetime(2026, 1, 12, tzinfo=dt.UTC).timestamp()
    expected = _expected(decisions, feedback, cutoff)
    assert report["weeks"][0]["all"]["requests"] == expected[("2026-W03", "all")]["requests"]
    assert report["weeks"][0]["all"]["avg_cost_usd"] == pytest.approx(expected[("2026-W03", "all")]["avg_cost_usd"])


def test_a_request_scored_twice_counts_once_with_its_latest_score(tmp_path: Path) -> None:
    decision = {"type": "decision", "time": "2026-01-07T10:00:00.000Z", "request_id": "r1", "tier": "free",
                "served_model": "m", "rule": "short", "attempts": [{"model": "m"}], "cost_usd": 0.01,
                "outcome": "ok", "duration_ms": 5.0, "ttft_ms": None}
    scores = [{"type": "feedback", "time": "2026-01-07T10:05:00.000Z", "request_id": "r1", "score": 0.2},
              {"type": "feedback", "time": "2026-01-07T10:01:00.000Z", "request_id": "r1", "score": 0.9}]
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in [scores[0], decision, scores[1]]) + b"\n")
    week = orjson.loads(_report(str(path), "--json"))["weeks"][0]
    assert week["all"]["quality"] == pytest.approx(0.2)
    assert week["all"]["feedback"] == 1


async def test_html_report_opens_in_a_browser_with_its_charts_drawn(log, tmp_path: Path) -> None:
    from .browser import artifacts_dir, chromium

    path, decisions, feedback = log
    page_path = tmp_path / "report.html"
    _report(str(path), "--html", str(page_path))
    text = page_path.read_text()
    data = orjson.loads(re.search(r'<script id="report-data" type="application/json">(.*?)</script>', text,
                                  re.S).group(1))      # type: ignore[union-attr]
    # The charts' data, checked against the log: 21 days, cost per day and tier, skip reasons.
    by_day_tier: dict[tuple[int, str], float] = defaultdict(float)
    reasons: dict[str, int] = defaultdict(int)
    for d in decisions:
        day = int(dt.datetime.fromisoformat(d["time"]).timestamp()) // 86400 * 86400
        by_day_tier[(day, d["tier"])] += d["cost_usd"]
        for skip in d["skipped"]:
            reasons["skipped: " + skip["reason"].split(":")[0]] += 1
    assert len(data["days"]) == len({day for day, _ in by_day_tier}) >= 15
    for tier, values in data["cost_by_tier"].items():
        for day, value in zip(data["days"], values):
            assert value == pytest.approx(by_day_tier.get((day, tier), 0.0), abs=1e-12)
    assert dict(data["skip_reasons"]) == reasons and data["requests"] == len(decisions)
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text.replace(
        "https://github.com/leeoniya/uPlot", "")                  # nothing to fetch: it is all inline

    async with chromium() as browser:
        page = await browser.page()
        await page.goto(page_path.as_uri())
        await page.wait_for_selector("#chart-quality canvas")
        drawn = [count for count, _ in await _series_drawn(page)]
        assert len(drawn) == 4 and all(n > 200 for n in drawn), drawn
        assert await page.locator("#reasons .reason").count() == len(reasons)
        assert await page.locator("table:not(.u-legend)").count() == 3         # the three weeks
        await page.screenshot(path=str(artifacts_dir() / "report.png"), full_page=True)
        assert browser.errors == []
        assert browser.left_loopback() == [] and browser.requests == [page_path.as_uri()]


async def test_a_report_of_one_day_draws_that_day_in_the_middle(tmp_path: Path) -> None:
    """A first report often covers a single day: it is shown with a day either side, not at
    the left edge of a span of years."""
    from .browser import chromium

    when = dt.datetime(2026, 1, 7, 12, tzinfo=dt.UTC).timestamp()
    records = []
    for i in range(3):
        d = Decision(f"day-{i}", 0.0, time=when + i)
        d.tier, d.rule, d.outcome, d.cost_usd, d.duration_ms = "standard", "short", "ok", 0.001, 10.0
        d.attempts.append(AttemptRecord("alpha", "x/y/0", "p", 0.0))
        d.served_model = "alpha"
        records.append(orjson.dumps(d.to_json()))
    log_path, page_path = tmp_path / "decisions.jsonl", tmp_path / "report.html"
    log_path.write_bytes(b"\n".join(records) + b"\n")
    _report(str(log_path), "--html", str(page_path))
    async with chromium() as browser:
        page = await browser.page()
        await page.goto(page_path.as_uri())
        await page.wait_for_selector("#chart-fallback canvas")
        spots = [where for _, where in await _series_drawn(page)]
        assert browser.errors == []
    assert all(spot is not None and 0.4 < spot < 0.75 for spot in spots[:3]), spots    # cost, average, fallback


def test_a_client_that_left_is_not_a_reason_an_attempt_failed() -> None:
    from proxy.commands.report import skip_reasons

    left, failed = Decision("left", 0.0), Decision("failed", 0.0)
    left.attempts.append(AttemptRecord("alpha", "x/y/0", "p", 0.0, failure="client_disconnected"))
    failed.attempts.append(AttemptRecord("alpha", "x/y/0", "p", 0.0, failure="timeout"))
    assert skip_reasons([left.to_json(), failed.to_json()]) == [("attempt failed: timeout", 1)]
