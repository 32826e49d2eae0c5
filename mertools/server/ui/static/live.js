// The live panel: /stats read a few times a second; tiles of recent figures, a sparkline of tokens/s over the last
// minute and the layer x expert map. A failed reading shows its reason under the panel and the polling goes on.

import { getJSON } from "./api.js";
import { HeatMap } from "./heat.js";
import { History, bucketDelta, buckets, delta, get, perSecond, quantile, rate } from "./rates.js";

const MINUTE = 60, SHORT = 5, HEAT_WINDOW = 2; // seconds
const fmt = (v, digits = 1) => (v == null || !Number.isFinite(v) ? "–" : v.toFixed(digits));

function seconds(v) {
  if (v == null) return "–";
  return v < 1 ? `${(v * 1000).toFixed(0)} ms` : `${v.toFixed(2)} s`;
}

function bytes(v) {
  if (v == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export class LivePanel {
  constructor(els, onAuthError) {
    this.els = els;
    this.onAuthError = onAuthError;
    this.history = new History(MINUTE + 2);
    this.heat = new HeatMap(els.heatmap, els.heatTip, els.heatSummary);
    this.timer = null;
    this.busy = false;
  }

  start(interval = 300) {
    this.stop();
    this.timer = setInterval(() => this.poll(), interval);
    this.poll();
  }

  stop() {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  async poll() {
    if (this.busy) return; // a slow answer: skip a beat rather than pile requests up
    this.busy = true;
    try {
      const reading = await getJSON("/stats");
      if (typeof reading !== "object" || reading === null || typeof reading.tokens !== "object") {
        throw new Error("/stats did not answer a mertools server's statistics");
      }
      this.history.add(reading);
      this.els.note.textContent = "";
      this.render();
    } catch (e) {
      this.els.note.textContent = `live figures unavailable: ${e.message}`;
      if (e.status === 401) this.onAuthError(e.message);
    } finally {
      this.busy = false;
    }
  }

  render() {
    const h = this.history, now = h.latest(), els = this.els;
    // the base of the "last minute" figures: a minute back, or the page's first reading when it is younger; none yet
    // with a single reading. get(null, ...) is null, and delta(x, null) is all of x: no base, no rate.
    const minute = h.at(MINUTE), short = h.at(SHORT);
    const since = (base, ...path) => delta(get(now, ...path), get(base, ...path));
    const ratePer = (base, ...path) => (base ? rate(get(now, ...path), get(base, ...path), now.time - base.time) : null);
    els.tokS.textContent = fmt(ratePer(minute, "tokens", "generated"));
    const ttftRecent = minute ? quantile(bucketDelta(buckets(now.ttft_s), buckets(minute.ttft_s)), 0.5) : null;
    els.ttft.textContent = ttftRecent != null ? seconds(ttftRecent)
      : now.ttft_s && now.ttft_s.p50 != null ? `${seconds(now.ttft_s.p50)} (all time)` : "–";
    els.requests.textContent = `${get(now, "requests", "running") ?? "–"} / ${get(now, "requests", "waiting") ?? "–"}`;
    const looked = since(minute, "experts", "lookups"), hits = since(minute, "experts", "hits");
    els.hitRate.textContent = looked > 0 ? `${(100 * hits / looked).toFixed(1)}%` : "–";
    els.hitRate.title = `${hits} hits of ${looked} expert lookups`;
    const disk = ratePer(short, "disk", "bytes_read");
    els.disk.textContent = disk != null ? fmt(disk / 1e6) : "–";
    els.totals.textContent = `${Math.round(get(now, "tokens", "generated") ?? 0)} / ${bytes(get(now, "memory", "rss_bytes"))}`;
    this.drawSpark();
    this.heat.draw(now, h.at(HEAT_WINDOW));
  }

  drawSpark() {
    const canvas = this.els.sparkline;
    const values = perSecond(this.history.readings, MINUTE);
    const width = Math.max(120, Math.floor(canvas.clientWidth || 300)), height = canvas.height;
    if (canvas.width !== width) canvas.width = width;
    const g = canvas.getContext("2d");
    g.clearRect(0, 0, width, height);
    const top = Math.max(1, ...values);
    const w = width / values.length;
    g.fillStyle = "#7aa2f7";
    values.forEach((v, i) => {
      const bar = (v / top) * (height - 14);
      g.fillRect(i * w, height - bar, Math.max(1, w - 1), bar);
    });
    g.fillStyle = "#8a93a3";
    g.font = "11px system-ui, sans-serif";
    g.fillText(`max ${top.toFixed(1)} tok/s`, 4, 11);
    canvas.dataset.last = values[values.length - 1].toFixed(3);
  }
}
