// Draws the report's charts from the data in the page; values are put in as text only.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const palette = ["#2f6fde", "#1a7f37", "#c62828", "#b26a00", "#7b1fa2", "#00838f", "#5d4037", "#455a64"];
  const days = data.days;
  const DAY_S = 86400;
  // A single day would leave uPlot to choose a span of years after it: show it with a day either side.
  const dayRange = (u, min, max) => (days.length === 1 ? [days[0] - DAY_S, days[0] + DAY_S] : [min, max]);

  function chart(id, series, values, format, yRange) {
    const target = document.getElementById(id);
    const width = Math.max(360, target.clientWidth || 560);
    return new uPlot({
      width: width, height: 240, legend: { live: false },
      scales: yRange ? { x: { time: true, range: dayRange }, y: { range: yRange } }
        : { x: { time: true, range: dayRange } },
      series: [{}].concat(series.map((name, i) => ({
        label: name, stroke: palette[i % palette.length], width: 2, spanGaps: true,
        points: { show: true, size: 5 },
      }))),
      axes: [{}, { size: 70, values: (u, ticks) => ticks.map(format) }],
    }, [days].concat(values), target);
  }

  const money = (v) => v == null ? "" : "$" + Number(v.toPrecision(3));
  const share = (v) => v == null ? "" : (v * 100).toFixed(0) + "%";
  const score = (v) => v == null ? "" : v.toFixed(2);
  chart("chart-cost", data.tiers, data.tiers.map((t) => data.cost_by_tier[t]), money);
  chart("chart-avg", ["all requests"], [data.avg_cost], money);
  chart("chart-fallback", ["fallback rate"], [data.fallback_rate], share, [0, 1]);      // rates and scores
  chart("chart-quality", data.tiers, data.tiers.map((t) => data.quality_by_tier[t]), score, [0, 1]);   // are 0-1

  const reasons = document.getElementById("reasons");
  const most = data.skip_reasons.length ? data.skip_reasons[0][1] : 1;
  for (const [reason, count] of data.skip_reasons) {
    const row = document.createElement("div");
    row.className = "reason";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = reason;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.max(2, 400 * count / most) + "px";
    const n = document.createElement("span");
    n.className = "count";
    n.textContent = String(count);
    row.append(label, bar, n);
    reasons.appendChild(row);
  }
  if (!data.skip_reasons.length) reasons.textContent = "no candidate was skipped and no attempt failed";
})();
