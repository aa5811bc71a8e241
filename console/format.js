// Times, durations and the progress rate, for people to read.

/** "3h 20m", "45s", "2d 4h": the two largest units of a number of seconds. */
export function duration(seconds) {
  const total = Math.max(0, Math.round(seconds));
  const units = [
    ["d", 86400],
    ["h", 3600],
    ["m", 60],
    ["s", 1],
  ];
  const first = units.findIndex(([, size]) => total >= size);
  if (first === -1) return "0s";
  const [bigName, bigSize] = units[first];
  const big = Math.floor(total / bigSize);
  if (first === units.length - 1) return `${big}${bigName}`;
  const [smallName, smallSize] = units[first + 1];
  return `${big}${bigName} ${Math.floor((total - big * bigSize) / smallSize)}${smallName}`;
}

/** Now, in Unix seconds. */
export function nowSeconds() {
  return Date.now() / 1000;
}

/** "5m ago" for a Unix second in the past. */
export function age(unixSeconds) {
  if (unixSeconds === null || unixSeconds === undefined) return "—";
  return `${duration(nowSeconds() - unixSeconds)} ago`;
}

/** How long until a batch's completion window ends, or that it has. */
export function expiresIn(batch) {
  if (batch.expires_at === null || batch.expires_at === undefined) return "—";
  if (["completed", "failed", "expired", "cancelled"].includes(batch.status)) return "—";
  const left = batch.expires_at - nowSeconds();
  return left > 0 ? `in ${duration(left)}` : "due now";
}

/** A Unix second as a local date and time, "2026-11-30 21:58:26". */
export function timestamp(unixSeconds) {
  if (unixSeconds === null || unixSeconds === undefined) return "—";
  const d = new Date(unixSeconds * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** A whole number with thousands separators. */
export function count(n) {
  return Number(n ?? 0).toLocaleString("en-US");
}

/** Requests per second of one batch, estimated from the updates this page saw: keeps
 * the samples of the last minute, and the rate is the change over that span. */
export class Rate {
  constructor(windowMs = 60_000, maxSamples = 20) {
    this.windowMs = windowMs;
    this.maxSamples = maxSamples;
    this.samples = [];
  }

  /** Records how many requests were done at `atMs`. */
  add(done, atMs = Date.now()) {
    const last = this.samples.at(-1);
    if (last && last.done === done) return;
    this.samples.push({ done, atMs });
    const oldest = atMs - this.windowMs;
    while (this.samples.length > 2 && (this.samples[0].atMs < oldest || this.samples.length > this.maxSamples)) {
      this.samples.shift();
    }
  }

  /** Requests per second, or null while fewer than two samples span time. */
  perSecond() {
    if (this.samples.length < 2) return null;
    const first = this.samples[0];
    const last = this.samples.at(-1);
    const seconds = (last.atMs - first.atMs) / 1000;
    if (seconds <= 0 || last.done <= first.done) return null;
    return (last.done - first.done) / seconds;
  }
}

/** The rate of a batch: from the updates this page saw, or, until it has seen two,
 * the average since the batch started (`in_progress_at`). */
export function batchRate(batch, rate) {
  const recent = rate.perSecond();
  if (recent !== null || batch.status !== "in_progress" || !batch.in_progress_at) return recent;
  const counts = batch.request_counts ?? {};
  const done = (counts.completed ?? 0) + (counts.failed ?? 0);
  const seconds = nowSeconds() - batch.in_progress_at;
  return seconds >= 1 && done > 0 ? done / seconds : null;
}

/** "12.5/s" or "—". */
export function rateText(perSecond) {
  if (perSecond === null) return "—";
  return perSecond >= 10 ? `${Math.round(perSecond)}/s` : `${perSecond.toFixed(1)}/s`;
}

/** Time left at `perSecond` for a batch's remaining requests, or "—". */
export function timeLeft(batch, perSecond) {
  const counts = batch.request_counts ?? {};
  const left = (counts.total ?? 0) - (counts.completed ?? 0) - (counts.failed ?? 0);
  if (perSecond === null || left <= 0 || batch.status !== "in_progress") return "—";
  return duration(left / perSecond);
}
