"""Restart-and-verify (issue 13): a cut stream rescued on a candidate that cannot take a
prefill. First the `Verifier` alone, exactly, on hand-made chunks; then on real sockets in
front of the simulator, whose models answer deterministically unless told to differ."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.breaker import CLOSED
from proxy.errors import FailureClass, UpstreamFailure
from proxy.sse import SSEParser
from proxy.verify import MAX_CHARS, Verifier

from .conftest import Fleet, MakeGateway, model_entry
from .streams import expected_text, stream_chat
from .test_resilience import TIMEOUTS, capture

SENT = "The quick brown fox "


def chunk(content: str | None = None, finish: str | None = None, **delta: Any) -> bytes:
    if content is not None:
        delta["content"] = content
    return orjson.dumps({"id": "x", "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def contents(payloads: list[bytes]) -> list[tuple[str | None, str | None]]:
    out = []
    for payload in payloads:
        choice = orjson.loads(payload)["choices"][0]
        out.append((choice["delta"].get("content"), choice["finish_reason"]))
    return out


def feeding(verifier: Verifier, payloads: list[bytes]) -> Any:
    """The verifier around a translator that returns `payloads`, one per event."""
    queue = list(payloads)
    feed = verifier.wrap(lambda name, data: [queue.pop(0)])
    return lambda: list(feed(None, b""))


def test_the_text_already_sent_is_dropped_and_the_rest_passes_at_any_chunking() -> None:
    clock = [0.0]
    verifier = Verifier(SENT, 10.0, lambda: clock[0])
    upstream = [chunk("", role="assistant"), chunk("The qu"), chunk("ick brown f"), chunk("ox jum"), chunk("ps "),
                chunk(None, "stop")]
    feed = feeding(verifier, upstream)
    assert [feed() for _ in range(3)] == [[], [], []]     # a role chunk and reproduced text: held back
    assert not verifier.verified and verifier.position == len("The quick brown f")
    assert contents(feed()) == [("jum", None)]            # the piece that completes it: only its rest
    assert verifier.verified
    assert feed() == [upstream[4]] and feed() == [upstream[5]]    # then the translator's own payloads


def test_a_match_that_ends_on_a_piece_boundary_sends_nothing_of_that_piece() -> None:
    verifier = Verifier(SENT, 10.0, lambda: 0.0)
    feed = feeding(verifier, [chunk("The quick "), chunk("brown fox "), chunk("jumps ")])
    assert feed() == [] and feed() == [] and verifier.verified
    assert contents(feed()) == [("jumps ", None)]


def test_an_end_right_at_the_match_keeps_its_finish() -> None:
    verifier = Verifier(SENT, 10.0, lambda: 0.0)
    feed = feeding(verifier, [chunk("The quick brown "), chunk("fox ", "stop")])
    assert feed() == []
    assert contents(feed()) == [("", "stop")]
    assert verifier.verified


@pytest.mark.parametrize(("upstream", "reason"), [
    ([chunk("The quick"), chunk(" red fox")], "differs from the text already sent at character 10"),
    ([chunk("A quick")], "at character 0"),
    ([chunk("The quick brown"), chunk(None, "stop")], "ended after reproducing 15 of the 20"),
    ([chunk("The "), chunk(tool_calls=[{"index": 0, "function": {"arguments": "{"}}])], "tool call"),
])
def test_anything_but_the_same_text_is_a_divergence(upstream: list[bytes], reason: str) -> None:
    verifier = Verifier(SENT, 10.0, lambda: 0.0)
    feed = feeding(verifier, upstream)
    with pytest.raises(UpstreamFailure) as caught:
        for _ in upstream:
            assert feed() == []
    assert caught.value.kind is FailureClass.DIVERGED and reason in caught.value.message
    assert not verifier.verified


def test_verification_is_bounded_in_time_and_an_early_end_is_named() -> None:
    clock = [0.0]
    verifier = Verifier(SENT, 2.5, lambda: clock[0])
    feed = feeding(verifier, [chunk("The "), chunk("quick ")])
    assert feed() == []
    clock[0] = 2.6
    with pytest.raises(UpstreamFailure, match="in time"):
        feed()
    assert Verifier(SENT, 1.0, lambda: 0.0).shortfall().kind is FailureClass.DIVERGED


# --------------------------------------------------------------------------- on real sockets


def continuing(primary: str, backup: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A continuing chain whose second model has no `prefill` capability."""
    models = {"primary": model_entry(primary), "backup": model_entry(backup)}
    routes = {"chains": {"main": {"models": ["primary", "backup"], "on_stream_failure": "continue"}},
              "default": "main"}
    return models, routes


async def test_a_cut_stream_is_restarted_and_verified_on_a_candidate_without_prefill(
        fleet: Fleet, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(*continuing("p-cut5-n12", "b-n12"), timeouts=TIMEOUTS)
    records = capture(gw)
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main", stream_options={"include_usage": True})
    assert r.complete and r.text == expected_text(12)           # the whole answer, once, in order, [DONE]
    assert r.headers["X-Route-Model"] == "primary"
    (restarted,) = fleet.sim.requests_for("b-n12")
    assert restarted.body["messages"] == [{"role": "user", "content": "hello"}]    # no assistant prefill
    (record,) = records
    first, second = record.attempts
    assert (first.failure, second.failure, record.outcome) == ("protocol", None, "ok")
    assert second.regenerated_chars == len(expected_text(5))
    # The regenerated prefix is wasted: its share of the restart's 12 output tokens at 2.0 $/M.
    repeated = round(12 * len(expected_text(5)) / len(expected_text(12)))
    assert second.regenerated_cost_usd == pytest.approx(repeated * 2.0 / 1e6)
    assert record.wasted_cost_usd == pytest.approx(first.cost_usd + second.regenerated_cost_usd)
    assert orjson.loads(orjson.dumps(record.to_json()))["attempts"][1]["regenerated_chars"] == len(expected_text(5))


async def test_a_restart_that_answers_differently_never_reaches_the_client(fleet: Fleet,
                                                                           make_gateway: MakeGateway) -> None:
    # It agrees on the first three words and differs from the fourth, inside the five already sent.
    gw = await make_gateway(*continuing("p-cut5-n12", "b-n12-differ3"), timeouts=TIMEOUTS)
    records = capture(gw)
    async with aiohttp.ClientSession() as s:
        # Five: the fifth cut opens the primary's breaker (consecutive: 5), and a sixth request would
        # go to the backup first, as a plain answer.
        answers = [await stream_chat(s, gw.base, "main") for _ in range(5)]
    for r in answers:
        assert r.status == 200 and r.error is not None and not r.done and not r.after_end
        assert r.text == expected_text(5)                       # what the primary sent, and nothing more
    assert all(_no_prefill(seen.body) for seen in fleet.sim.requests_for("b-n12-differ3"))
    assert [a.failure for a in records[0].attempts] == ["protocol", "diverged"]
    assert records[0].outcome == "stream_error" and records[0].attempts[1].wasted
    # A model that answers differently is healthy: five divergences in a row leave its breaker closed.
    assert gw.gateway.state.breaker("backup/sim-openai/0").state == CLOSED


async def test_a_divergence_leaves_what_the_restart_generated_in_its_token_bucket(
        fleet: Fleet, make_gateway: MakeGateway) -> None:
    """A restart that diverged had generated text (billed by the provider, counted as wasted):
    its tpm reservation stands, like any attempt that produced output without usage."""
    models, routes = continuing("p-cut5-n12", "b-n12-differ3")
    models["backup"]["deployments"][0]["limits"] = {"tpm": 6000}     # refills 100 a second
    gw = await make_gateway(models, routes, timeouts=TIMEOUTS)
    records = capture(gw)
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.error is not None and [a.failure for a in records[0].attempts] == ["protocol", "diverged"]
    assert records[0].attempts[1].content_seen
    level = gw.gateway.state.buckets["deployment:backup/sim-openai/0:tpm"].level
    assert level < 6000 - 500                   # the reservation (input + 1,024) was not handed back


async def test_a_chain_moves_past_a_divergence_to_a_candidate_that_verifies(fleet: Fleet,
                                                                            make_gateway: MakeGateway) -> None:
    models = {"primary": model_entry("p-cut5-n12"), "varied": model_entry("v-n12-differ0"),
              "steady": model_entry("s-n12")}
    routes = {"chains": {"main": {"models": list(models), "on_stream_failure": "continue"}}, "default": "main"}
    gw = await make_gateway(models, routes, timeouts=TIMEOUTS)
    records = capture(gw)
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert r.complete and r.text == expected_text(12)
    assert [a.failure for a in records[0].attempts] == ["protocol", "diverged", None]


async def test_a_restart_that_cannot_catch_up_in_time_ends_with_the_error_event(fleet: Fleet,
                                                                                make_gateway: MakeGateway) -> None:
    # first_token_s 1.5 + idle_s 1.5 = 3 s to reproduce five words arriving 0.9 s apart (3.6 s).
    gw = await make_gateway(*continuing("p-cut5-n12", "b-n12-gap900"), timeouts=TIMEOUTS)
    records = capture(gw)
    started = time.monotonic()
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    took = time.monotonic() - started
    assert r.status == 200 and r.error is not None and not r.done and r.text == expected_text(5)
    failed = records[0].attempts[1]
    assert failed.failure == "diverged" and "in time" in (failed.message or "")
    assert took < 3.0 + 0.9 + 2.0                 # the bound, one word's gap, and room for a busy machine


async def test_a_prefix_too_long_to_regenerate_is_not_restarted(fleet: Fleet, make_gateway: MakeGateway) -> None:
    tokens = 3400                                 # about 19,000 characters before the cut
    gw = await make_gateway(*continuing(f"p-cut{tokens - 100}-n{tokens}", f"b-n{tokens}"), timeouts=TIMEOUTS)
    records = capture(gw)
    async with aiohttp.ClientSession() as s:
        r = await stream_chat(s, gw.base, "main")
    assert len(expected_text(tokens - 100)) > MAX_CHARS
    assert r.status == 200 and r.error is not None and not r.done and r.text == expected_text(tokens - 100)
    assert not fleet.sim.requests_for(f"b-n{tokens}")
    assert "too long to regenerate" in records[0].skipped[-1]["reason"]


async def test_a_restart_on_an_anthropic_deployment_for_a_messages_client_is_translated_and_verified(
        fleet: Fleet, make_gateway: MakeGateway) -> None:
    """The Messages surface passes an Anthropic deployment's own events through (native), but
    a restart must go through the verifier: it is sent translated, and filtered."""
    models = {"primary": model_entry("mp-cut3-n8"), "claude": model_entry("mc-n8", "sim-anthropic")}
    routes = {"chains": {"main": {"models": list(models), "on_stream_failure": "continue"}}, "default": "main"}
    gw = await make_gateway(models, routes, timeouts=TIMEOUTS)
    body = {"model": "main", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "hello"}]}
    async with aiohttp.ClientSession() as session, \
            session.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": "unused"}) as response:
        events = SSEParser().feed(await response.read())
    names = [e.name for e in events]
    assert response.status == 200 and names.count("message_start") == 1 and names[-1] == "message_stop"
    assert "error" not in names
    text = "".join(orjson.loads(e.data)["delta"].get("text", "") for e in events if e.name == "content_block_delta")
    assert text == expected_text(8)
    (restarted,) = fleet.sim.requests_for("mc-n8")
    assert restarted.protocol == "anthropic" and _no_prefill(restarted.body)


def _no_prefill(body: dict[str, Any]) -> bool:
    return body["messages"][-1]["role"] != "assistant"
