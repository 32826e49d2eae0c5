// The layer x expert map of /stats' "heat": each cell one expert, coloured by what happened to it lately (hit or
// missed in the last seconds) or else by where it is (loading, in the cache, on disk). Drawn on a canvas sized to
// the panel; hovering names the cell.

import { gridDelta } from "./rates.js";

export const CLASSES = ["absent", "resident", "loading", "hit", "missed"];
const LEFT = 22, TOP = 14; // room for the layer and expert numbers
const COLOUR = { absent: "#2a2f3a", resident: "#2e7d32", loading: "#f2b233", hit: "#66e07a", missed: "#e5534b" };

// Each cell's class: an expert looked up in the last seconds is "hit" when most of those lookups hit, else
// "missed" (at a hundred tokens a second every expert misses now and then: the majority says which ones stay);
// one not looked up shows the cache's state now (/stats: 0 not held, 1 resident, 2 loading).
export function classify(now, before) {
  const heat = now.heat;
  const lookups = gridDelta(heat.lookups, before && before.heat ? before.heat.lookups : null);
  const hits = gridDelta(heat.hits, before && before.heat ? before.heat.hits : null);
  const fresh = !before || !before.heat; // no earlier reading: nothing is "recent" yet
  return heat.state.map((row, l) => row.map((s, e) => {
    if (!fresh && lookups[l][e] > 0) return 2 * hits[l][e] >= lookups[l][e] ? "hit" : "missed";
    return s === 2 ? "loading" : s === 1 ? "resident" : "absent";
  }));
}

export class HeatMap {
  constructor(canvas, tip, summary) {
    this.canvas = canvas;
    this.tip = tip;
    this.summary = summary;
    this.cells = null;
    this.detail = null;
    canvas.addEventListener("mousemove", (ev) => this.hover(ev));
    canvas.addEventListener("mouseleave", () => { this.tip.textContent = "\u00a0"; });
  }

  draw(now, before) {
    if (!now.heat) return;
    const cells = classify(now, before);
    const layers = cells.length, experts = layers ? cells[0].length : 0;
    this.cells = cells;
    this.detail = now.heat;
    const width = Math.max(120, Math.floor(this.canvas.clientWidth || 400));
    const left = LEFT, top = TOP;
    const cw = (width - left) / Math.max(1, experts);
    const ch = Math.max(3, Math.min(24, Math.floor(cw)));  // square-ish cells, at most 24 px high
    const height = top + Math.max(12, Math.ceil(ch * layers));
    if (this.canvas.width !== width) this.canvas.width = width;
    if (this.canvas.height !== height) this.canvas.height = height;
    this.canvas.style.height = height + "px";
    this.geometry = { left, top, cw, ch };
    const g = this.canvas.getContext("2d");
    g.fillStyle = "#14171d";
    g.fillRect(0, 0, width, height);
    // axis numbers, spaced so that they never overlap
    g.fillStyle = "#8a93a3";
    g.font = "10px system-ui, sans-serif";
    g.textBaseline = "middle";
    const lstep = Math.ceil(12 / ch), estep = Math.ceil(22 / cw);
    for (let l = 0; l < layers; l += lstep) g.fillText(String(l), 2, top + (l + 0.5) * ch);
    for (let e = 0; e < experts; e += estep) g.fillText(String(e), left + e * cw + 1, top / 2);
    const gap = cw >= 6 && ch >= 6 ? 1 : 0;
    const counts = Object.fromEntries(CLASSES.map((c) => [c, 0]));
    for (let l = 0; l < layers; l++) {
      for (let e = 0; e < experts; e++) {
        const c = cells[l][e];
        counts[c]++;
        g.fillStyle = COLOUR[c];
        const x = Math.floor(left + e * cw);
        g.fillRect(x, top + l * ch, Math.max(1, Math.floor(left + (e + 1) * cw) - x - gap), ch - gap);
      }
    }
    // what the test and a curious reader can read without pixels
    for (const c of CLASSES) this.canvas.dataset[c] = counts[c];
    this.canvas.dataset.layers = layers;
    this.canvas.dataset.experts = experts;
    const held = now.heat.state.reduce((n, row) => n + row.filter((s) => s === 1).length, 0);
    this.summary.textContent = `${held} of ${layers * experts} held; last 2 s: ${counts.hit} mostly hit, ` +
      `${counts.missed} mostly missed; ${counts.loading} loading`;
  }

  hover(ev) {
    if (!this.cells || !this.cells.length) return;
    const rect = this.canvas.getBoundingClientRect();
    const experts = this.cells[0].length, layers = this.cells.length;
    const { left, top, cw, ch } = this.geometry;
    const scale = this.canvas.width / rect.width; // CSS pixels to canvas pixels
    const e = Math.floor(((ev.clientX - rect.left) * scale - left) / cw);
    const l = Math.floor(((ev.clientY - rect.top) * scale - top) / ch);
    if (l < 0 || l >= layers || e < 0 || e >= experts) return;
    const lookups = this.detail.lookups[l][e], hits = this.detail.hits[l][e];
    this.tip.textContent = `layer ${l}, expert ${e}: ${this.cells[l][e]}; ${lookups} lookups, ${hits} hits since the start`;
  }
}
