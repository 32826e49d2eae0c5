// Figures from two /stats readings, as mertools/top/poll.py takes them: /stats reports counters since the start
// and the time read; a recent figure is the change between a base reading and the newest one. A counter that went
// down was restarted (a reload to a new layout starts the engine's counters again): its change is its new value.
// Pure functions and one small class; nothing here touches the page.

export function delta(now, before) {
  if (now == null) return 0;
  if (before == null || now < before) return Number(now);
  return now - before;
}

export function rate(now, before, seconds) {
  return seconds > 0 ? delta(now, before) / seconds : null;
}

export function get(reading, ...path) {
  let v = reading;
  for (const key of path) {
    if (v == null || typeof v !== "object") return null;
    v = v[key];
  }
  return v === undefined ? null : v;
}

// /stats' [[le, cumulative count], ...] (the last le "+Inf") as [[bound, count], ...].
export function buckets(h) {
  if (!h || !Array.isArray(h.buckets) || !h.buckets.length) return null;
  return h.buckets.map(([le, c]) => [le === "+Inf" ? Infinity : Number(le), Number(c)]);
}

// The cumulative buckets of what was observed between two readings (all of the newer when the histogram restarted).
export function bucketDelta(now, before) {
  if (!now) return null;
  if (!before || before.length !== now.length || now.some(([b, c], i) => b !== before[i][0] || c < before[i][1])) {
    return now.map(([b, c]) => [b, c]);
  }
  return now.map(([b, c], i) => [b, c - before[i][1]]);
}

// The q-quantile of cumulative buckets, linear inside a bucket as Prometheus' histogram_quantile; null when empty.
export function quantile(cum, q) {
  if (!cum || !cum.length || cum[cum.length - 1][1] <= 0) return null;
  const rank = q * cum[cum.length - 1][1];
  let lo = 0, below = 0;
  for (const [bound, count] of cum) {
    if (count >= rank) {
      if (!Number.isFinite(bound)) return lo;
      return lo + (bound - lo) * (count > below ? (rank - below) / (count - below) : 0);
    }
    lo = bound;
    below = count;
  }
  return lo;
}

// Per-cell growth of a layer x expert counter map (another shape: all of the new one).
export function gridDelta(now, before) {
  if (!before || before.length !== now.length || now.some((row, i) => row.length !== before[i].length)) {
    return now.map((row) => row.slice());
  }
  return now.map((row, i) => row.map((v, j) => (v >= before[i][j] ? v - before[i][j] : v)));
}

// The readings of about the last `window` seconds (server clock): at(seconds) is the newest reading at least that
// much older than the newest one (or the oldest kept). A clock that went back starts again.
export class History {
  constructor(window) {
    this.window = window;
    this.readings = [];
  }
  add(reading) {
    const last = this.latest();
    if (last && reading.time < last.time) this.readings = [];
    this.readings.push(reading);
    while (this.readings.length > 2 && this.readings[1].time <= reading.time - this.window) this.readings.shift();
  }
  latest() { return this.readings.length ? this.readings[this.readings.length - 1] : null; }
  at(seconds) {
    const last = this.latest();
    if (!last || this.readings.length < 2) return null;
    let base = this.readings[0];
    for (const r of this.readings) {
      if (r.time <= last.time - seconds) base = r; else break;
    }
    return base === last ? null : base;
  }
}

// Tokens generated in each whole second of the last `seconds`, oldest first (a reading's growth is spread over the
// seconds it covers), for the sparkline.
export function perSecond(readings, seconds) {
  const out = new Array(seconds).fill(0);
  if (readings.length < 2) return out;
  const end = readings[readings.length - 1].time;
  for (let i = 1; i < readings.length; i++) {
    const a = readings[i - 1], b = readings[i];
    const span = b.time - a.time;
    if (span <= 0) continue;
    const grown = delta(get(b, "tokens", "generated"), get(a, "tokens", "generated"));
    // the part of [a.time, b.time] falling in each second slot [end - seconds + k, end - seconds + k + 1]
    for (let k = 0; k < seconds; k++) {
      const lo = Math.max(a.time, end - seconds + k), hi = Math.min(b.time, end - seconds + k + 1);
      if (hi > lo) out[k] += grown * (hi - lo) / span;
    }
  }
  return out;
}
