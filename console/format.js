// Times, durations and rates, for people to read.

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

/** "in 3m" for a Unix second in the future, "due now" once it has passed. */
export function fromNow(unixSeconds) {
  if (unixSeconds === null || unixSeconds === undefined) return "—";
  const left = unixSeconds - nowSeconds();
  return left > 0 ? `in ${duration(left)}` : "due now";
}

/** How long until a batch's completion window ends, or that it has. */
export function expiresIn(batch) {
  if (["completed", "failed", "expired", "cancelled"].includes(batch.status)) return "—";
  return fromNow(batch.expires_at);
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

/** "12.5/s" for batchd's recent rate of a batch (`progress_rate`), or "—" without one. */
export function rateText(perSecond) {
  if (perSecond === null || perSecond === undefined) return "—";
  return perSecond >= 10 ? `${Math.round(perSecond)}/s` : `${perSecond.toFixed(1)}/s`;
}

/** "stalled for 14m 5s": how long since batchd marked a batch stalled (`stalled_at`). */
export function stalledFor(stalledAt) {
  return `stalled for ${duration(nowSeconds() - stalledAt)}`;
}
