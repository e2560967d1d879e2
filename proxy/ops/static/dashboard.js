// The operations page: draws the state the gateway sends, once a second, over one SSE stream.
// Every value is put in with textContent (never as HTML): model names, request ids and
// headers come from callers.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const usd = (v) => v == null ? "-" : "$" + (v >= 1 ? v.toFixed(2) : v >= 0.01 ? v.toFixed(4) : v.toFixed(6));
  const pct = (v) => v == null ? "-" : (v * 100).toFixed(1) + "%";
  const ms = (v) => v == null ? "-" : v < 10 ? v.toFixed(2) : v.toFixed(0);
  const num = (v) => v == null ? "-" : String(v);

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text != null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function fill(tableId, rows, empty) {
    const body = $(tableId).tBodies[0];
    const width = $(tableId).tHead.rows[0].cells.length;
    const fresh = document.createElement("tbody");
    for (const cells of rows) {
      const tr = document.createElement("tr");
      for (const cell of cells) tr.appendChild(cell instanceof Node ? cell : el("td", cell));
      fresh.appendChild(tr);
    }
    if (!rows.length) {
      const td = el("td", empty || "nothing yet", "empty");
      td.colSpan = width;
      fresh.appendChild(document.createElement("tr")).appendChild(td);
    }
    body.replaceWith(fresh);
    return fresh;
  }

  function numCell(text) { return el("td", text, "num"); }

  function duration(seconds) {
    if (seconds == null) return "-";
    if (seconds < 60) return seconds.toFixed(1) + " s";
    const m = Math.floor(seconds / 60), s = Math.floor(seconds % 60);
    return m < 60 ? m + " min " + s + " s" : Math.floor(m / 60) + " h " + (m % 60) + " min";
  }

  // Seconds left, or what it means once none are: a breaker's probe is due with the next request.
  function countdown(seconds, done) { return seconds > 0.05 ? duration(seconds) : done; }

  function bucketsCell(buckets) {
    const td = el("td");
    for (const b of buckets) {
      const wrap = el("span", null, "bucket");
      const bar = el("span", null, "bar");
      const fillBar = el("i");
      const share = b.capacity > 0 ? Math.max(0, Math.min(1, b.level / b.capacity)) : 0;
      fillBar.style.width = (share * 100).toFixed(1) + "%";
      if (share < 0.1) fillBar.className = "low";
      bar.appendChild(fillBar);
      wrap.appendChild(bar);
      wrap.appendChild(document.createTextNode(b.kind + " " + Math.floor(b.level) + " / " + b.capacity));
      td.appendChild(wrap);
    }
    if (!buckets.length) { td.textContent = "no limits"; td.className = "empty"; }
    return td;
  }

  // ------------------------------------------------------------------ charts (uPlot)
  const charts = {};
  // series: [label, colour, scale name, gaps spanned]; scales: {name: [side, tick format]}
  function chart(id, series, data, scales) {
    const target = $(id);
    const width = Math.max(300, target.clientWidth || 480);
    if (!charts[id]) {
      const axes = [{}];
      for (const [name, [side, format]] of Object.entries(scales)) {
        axes.push({ scale: name, side: side, size: 64, grid: { show: side === 3 },
          values: (u, ticks) => ticks.map(format) });
      }
      charts[id] = new uPlot({
        width: width, height: 200, legend: { live: false },
        scales: { x: { time: true } },
        series: [{}].concat(series.map((s) => ({ label: s[0], stroke: s[1], scale: s[2], width: 1.5, spanGaps: s[3] || false }))),
        axes: axes,
      }, data, target);
    } else {
      charts[id].setData(data);
    }
  }
  window.addEventListener("resize", () => {
    for (const id in charts) charts[id].setSize({ width: Math.max(300, $(id).clientWidth), height: 200 });
  });

  function rollingMinute(values) {       // each point: the sum of the 60 seconds up to it
    const out = [];
    let sum = 0;
    values.forEach((v, i) => { sum += v; if (i >= 60) sum -= values[i - 60]; out.push(Math.max(0, sum)); });
    return out;
  }

  // ------------------------------------------------------------------ one state document
  let probeDeadlines = [];       // [element, epoch ms] for the countdowns

  function draw(state) {
    const m = state.minute, received = Date.now();
    $("uptime").textContent = duration(state.uptime_s);
    $("in-flight").textContent = num(state.in_flight);
    $("total-requests").textContent = num(state.totals.requests);
    $("total-cost").textContent = usd(state.totals.cost_usd);
    $("rps").textContent = m.rps.toFixed(2);
    $("minute-requests").textContent = num(m.requests);
    $("error-rate").textContent = m.failed + " (" + pct(m.error_rate) + ")";
    $("refused").textContent = num(m.refused);
    $("fallback-rate").textContent = pct(m.fallback_rate);
    $("overhead").textContent = ms(m.overhead_ms.p50) + " / " + ms(m.overhead_ms.p99) + " ms";
    $("ttft").textContent = ms(m.ttft_ms.p50) + " / " + ms(m.ttft_ms.p99) + " ms";
    $("cost-minute").textContent = usd(m.cost_usd);
    $("cost-request").textContent = usd(m.cost_per_request_usd);
    $("wasted-minute").textContent = usd(m.wasted_cost_usd);

    const perSecond = (n) => (n / m.window_s).toFixed(2);
    fill("by-model", Object.entries(m.by_model).map(([k, n]) => [k, numCell(n), numCell(perSecond(n))]));
    fill("by-rule", Object.entries(m.by_rule).map(([k, n]) => [k, numCell(n), numCell(perSecond(n))]));
    fill("by-provider", Object.entries(m.by_provider).map(([k, p]) =>
      [k, numCell(p.attempts), numCell(p.failed), numCell(pct(p.failure_rate))]));
    const money = (o) => Object.entries(o).map(([k, t]) =>
      [k, numCell(t.requests), numCell(usd(t.cost_usd)), numCell(usd(t.cost_per_request_usd))]);
    fill("by-tier", money(m.by_tier));
    fill("by-key", money(m.by_key));

    const s = state.series;
    const plain = (v) => String(Number(v.toPrecision(3)));
    chart("chart-requests", [["requests", "#2f6fde", "n"], ["failed", "#c62828", "n"], ["fallbacks", "#b26a00", "n"]],
      [s.t, s.requests, s.failed, s.fallbacks], { n: [3, plain] });
    chart("chart-latency", [["added p50 (left)", "#2f6fde", "ms", true], ["added p99 (left)", "#7b1fa2", "ms", true],
      ["TTFT p50 (right)", "#1a7f37", "ttft", true]],
      [s.t, s.overhead_p50_ms, s.overhead_p99_ms, s.ttft_p50_ms], { ms: [3, plain], ttft: [1, plain] });
    chart("chart-cost", [["USD per minute", "#1a7f37", "usd"]],
      [s.t, rollingMinute(s.cost_usd)], { usd: [3, (v) => "$" + Number(v.toPrecision(2))] });

    const scope = { shared: "cluster-wide: breakers, holds and buckets of every instance (shared state)",
      degraded: "this instance only: the shared state cannot be reached", local: "this instance" };
    $("state-scope").textContent = scope[state.state.mode] || state.state.mode;
    probeDeadlines = [];
    const deployments = fill("deployment-table", state.state.deployments.map((d) => {
      const badge = el("span", d.breaker.replace("_", "-"), "badge " + d.breaker);
      const breaker = el("td"); breaker.appendChild(badge); breaker.className = "breaker";
      const probe = el("td", d.probe_in_s == null ? (d.breaker === "half_open" ? "probing" : "-") : countdown(d.probe_in_s, "due"), "probe");
      if (d.probe_in_s != null) probeDeadlines.push([probe, received + d.probe_in_s * 1000, "due"]);
      const hold = el("td", d.held_for_s == null ? "-" : countdown(d.held_for_s, "over"), d.held_for_s == null ? "" : "hold");
      if (d.held_for_s != null) probeDeadlines.push([hold, received + d.held_for_s * 1000, "over"]);
      return [el("td", d.id, "mono"), d.model, d.provider, breaker, probe, hold, numCell(d.in_flight), bucketsCell(d.buckets)];
    }), "no deployments");
    Array.from(deployments.rows).forEach((tr, i) => {
      const d = state.state.deployments[i];
      if (d) { tr.dataset.deployment = d.id; tr.dataset.breaker = d.breaker; }
    });
    fill("provider-buckets", state.state.providers.map((p) => [p.name, bucketsCell(p.buckets)]), "no provider limits");
    fill("key-buckets", state.state.keys.map((k) => [k.name, bucketsCell(k.buckets)]), "no key limits");

    const rows = fill("decision-table", state.decisions.map((d) => {
      const attempts = el("td");
      d.attempts.forEach((a, i) => {
        if (i) attempts.appendChild(document.createTextNode(" → "));
        attempts.appendChild(el("span", a.model + (a.failure ? " (" + a.failure + ")" : ""), a.failure ? "failure" : ""));
      });
      const skipped = el("td", d.skipped.map((x) => x.model + ": " + x.reason).join("; "));
      const ok = d.outcome === "ok";
      return [new Date(d.time * 1000).toLocaleTimeString(), el("td", d.request_id, "mono"), d.instance || "-",
        d.key || "-", d.tier || "-", (d.requested_model || "-") + (d.api && d.api !== "chat" ? " (" + d.api + ")" : ""), d.rule || "-", d.chain || "-",
        (d.served_model || "-") + (d.served_provider ? " @ " + d.served_provider : ""), attempts, skipped,
        el("td", d.outcome + " " + d.status, ok ? "outcome-ok" : "outcome-bad"), numCell(usd(d.cost_usd)),
        numCell(ms(d.duration_ms))];
    }), "no requests yet");
    Array.from(rows.rows).forEach((tr, i) => {
      const d = state.decisions[i];
      if (d) { tr.dataset.requestId = d.request_id; tr.addEventListener("click", () => openRecord(d.request_id)); }
    });

    const quality = (o) => Object.entries(o).map(([k, q]) => [k, numCell(q.mean.toFixed(3)), numCell(q.count)]);
    fill("quality-tier", quality(state.quality.tier), "no feedback yet");
    fill("quality-model", quality(state.quality.model), "no feedback yet");
  }

  setInterval(() => {
    const now = Date.now();
    for (const [cell, deadline, done] of probeDeadlines) cell.textContent = countdown((deadline - now) / 1000, done);
  }, 200);

  // ------------------------------------------------------------------ one request's record
  async function openRecord(requestId) {
    const status = $("find-status");
    status.className = ""; status.textContent = "looking…";
    const response = await fetch("/dashboard/requests/" + encodeURIComponent(requestId), { cache: "no-store" });
    const body = await response.json();
    if (!response.ok) {
      status.className = "bad";
      status.textContent = body.error ? body.error.message : "HTTP " + response.status;
      return;
    }
    status.textContent = "";
    $("record-title").textContent = "request " + requestId;
    $("record-body").textContent = JSON.stringify(body, null, 2);
    $("record").hidden = false;
  }
  $("find").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("find-id").value.trim();
    if (id) openRecord(id).catch((err) => { $("find-status").textContent = String(err); });
  });
  $("record-close").addEventListener("click", () => { $("record").hidden = true; });

  // ------------------------------------------------------------------ the live stream
  draw(JSON.parse($("initial-state").textContent));
  const link = $("link");
  const source = new EventSource("/dashboard/events");
  source.addEventListener("state", (event) => {
    link.textContent = "live"; link.className = "link live";
    draw(JSON.parse(event.data));
  });
  source.addEventListener("error", () => {
    link.textContent = source.readyState === EventSource.CLOSED ? "disconnected: reload the page" : "reconnecting";
    link.className = "link down";
  });
})();
