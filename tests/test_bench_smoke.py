"""The bench entry points run end to end with tiny bounded settings and emit the JSON their
users and the README rely on. No timing assertions: speed is what the benches report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_module(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def simserver() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.simserver", "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready "), proc.stderr.read() if proc.stderr else line
        yield int(line.split()[1])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_routing_reports_percentiles_per_config() -> None:
    result = as_json(run_module("bench.routing", "--quick"))
    assert set(result["configs"]) == {"shipped", "stress"}
    stress = result["configs"]["stress"]
    assert (stress["rules"], stress["models"]) == (50, 20)
    for figures in result["configs"].values():
        assert figures["iterations"] > 0
        assert 0 < figures["p50_us"] <= figures["p99_us"] <= figures["max_us"]
        assert set(figures["by_kind"]) == set(result["mix"])
    # the mix really exercises the rules: the long document and the code task take their rules
    shipped = result["configs"]["shipped"]["by_kind"]
    assert shipped["long-context"]["rule"] == "long-context"
    assert shipped["code"]["rule"] == "code"


def test_overhead_measures_both_paths() -> None:
    proc = run_module("bench.overhead", "--quick", "--runs", "1", timeout=90)
    result = as_json(proc)
    latency = result["latency_200rps"]
    for path in ("direct", "gateway"):
        assert latency[path]["n"] > 0 and latency[path]["errors"] == 0
        assert result["throughput"][path]["rps"] > 0
        streaming = result["streaming"][path]
        assert streaming["errors"] == 0 and streaming["chunks"] > 0
        assert streaming["ttft_p50_ms"] > 0
    assert result["throughput"]["bare"]["rps"] > 0                 # the framework floor ran too
    assert result["throughput"]["gateway"]["cpu_us_per_request"] > 0
    for key in ("added_p50_ms", "added_p99_ms"):
        assert isinstance(latency[key], float)
    assert {"added_ttft_p50_ms", "added_chunk_p99_ms"} <= set(result["streaming"])
    memory = result["memory"]
    assert memory["open_streams"] == result["settings"]["open_streams"] and memory["errors"] == 0
    assert memory["rss_idle_kb"] > 0 and "kb_per_stream" in memory
    assert "| figure | direct | gateway |" in proc.stderr
    if shutil.which("redis-server") is not None:        # the same gateway with its state in Redis
        assert latency["redis"]["n"] > 0 and latency["redis"]["errors"] == 0
        assert isinstance(latency["redis_minus_memory_p50_ms"], float)
        assert "state in Redis" in proc.stderr


def test_overhead_page_mode_compares_no_page_with_pages_streaming() -> None:
    proc = run_module("bench.overhead", "--quick", "--runs", "1", "--page", timeout=90)
    page = as_json(proc)["page"]
    for state in ("direct", "closed", "open"):
        assert page[state]["n"] > 0 and page[state]["errors"] == 0 and page[state]["stream_errors"] == 0
    assert page["open"]["page_frames"] >= 2                 # the pages really were open and streaming
    assert isinstance(page["page_minus_no_page_p50_ms"], float)
    assert "| figure | direct | gateway, no page | gateway, pages open |" in proc.stderr


def test_ops_reports_the_cost_per_request_and_per_frame() -> None:
    result = as_json(run_module("bench.ops", "--quick", "--rates", "50"))
    assert 0 < result["observe_per_request"]["min_us"] <= result["observe_per_request"]["median_us"]
    (frame,) = result["frame"]
    assert frame["rate_rps"] == 50 and 0 < frame["min_ms"] <= frame["median_ms"] and frame["frame_bytes"] > 1000


def test_load_summarises_plain_and_streamed_requests(simserver: int) -> None:
    url = f"http://127.0.0.1:{simserver}/openai/v1/chat/completions"
    plain = as_json(run_module("bench.load", url, "--model", "bench-instant", "--concurrency", "4",
                               "--count", "30", "--duration", "10", "--json", "--quiet"))
    assert plain["count"] == 30 and plain["ok"] == 30 and plain["errors"] == {}
    assert plain["throughput_rps"] > 0 and plain["latency_ms"]["p50"] > 0
    assert "ttft_ms" not in plain

    streamed = as_json(run_module("bench.load", url, "--model", "bench-n3", "--rate", "50", "--count", "10",
                                  "--stream", "--json", "--quiet"))
    assert streamed["ok"] == 10 and streamed["ttft_ms"]["p50"] > 0


def test_load_counts_errors_by_status(simserver: int) -> None:
    url = f"http://127.0.0.1:{simserver}/openai/v1/chat/completions"
    proc = run_module("bench.load", url, "--model", "bench-429", "--concurrency", "2", "--count", "6", "--json",
                      "--quiet")
    assert proc.returncode == 1             # nothing succeeded: a script can tell
    result = json.loads(proc.stdout)
    assert result["ok"] == 0 and result["errors"] == {"429": 6}


def test_load_refuses_a_remote_url_without_allow_remote() -> None:
    proc = run_module("bench.load", "http://203.0.113.7:8080", "--count", "1")
    assert proc.returncode == 2
    assert "--allow-remote" in proc.stderr
