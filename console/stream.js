// Server-Sent Events read with fetch streaming: an EventSource cannot send an
// Authorization header. A stream reconnects by itself after a drop, resuming after the
// last event id it received (Last-Event-ID), with a growing pause between attempts.

import { ApiError, FETCH_OPTIONS, authorization, errorOf } from "./api.js";

/** One event stream is refused beyond this many bytes without a line end: batchd's
 * largest event (one batch) is far smaller, so more means something is wrong. */
const MAX_LINE_BYTES = 8 * 1024 * 1024;

/** No event at all for this long (batchd sends a heartbeat or bookmark every 15 s
 * by default) means the connection is dead without having said so. */
const SILENCE_MS = 45_000;

/** Answers after which reconnecting cannot help: the request itself is wrong. */
const FATAL = new Set([400, 401, 403, 404, 410, 413]);

/** Parses an SSE body, calling `onMessage({ event, id, data })` for each message. */
export async function readMessages(body, onMessage, onActivity = () => {}) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let message = { event: "message", id: null, data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onActivity();
    // Only the new text is searched for line ends (a large event arrives in chunks).
    let searchFrom = buffer.length;
    buffer += value;
    let start = 0;
    let end;
    while ((end = buffer.indexOf("\n", searchFrom)) !== -1) {
      let line = buffer.slice(start, end);
      start = end + 1;
      searchFrom = start;
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line === "") {
        if (message.data.length > 0 || message.id !== null) {
          onMessage({ event: message.event, id: message.id, data: message.data.join("\n") });
        }
        message = { event: "message", id: null, data: [] };
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon === -1 ? line : line.slice(0, colon);
      let value = colon === -1 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") message.event = value;
      else if (field === "data") message.data.push(value);
      else if (field === "id") message.id = value;
    }
    buffer = buffer.slice(start);
    if (buffer.length > MAX_LINE_BYTES) {
      await reader.cancel();
      throw new Error("an event stream line exceeds 8 MiB");
    }
  }
}

/** A stream that stays open: `onEvent(message)` per event, `onState("live" |
 * "reconnecting")` as the connection comes and goes, `onFatal(error)` when batchd
 * refuses the request itself (then it stops). `url()` is asked on every attempt;
 * `finished()` tells whether a stream that ended normally is done (a watch ends
 * after the terminal status) rather than dropped. */
export class EventStream {
  constructor({ url, lastEventId = null, onEvent, onState = () => {}, onFatal = () => {}, finished = () => false }) {
    Object.assign(this, { url, lastEventId, onEvent, onState, onFatal, finished });
    this.stopped = false;
    this.controller = null;
  }

  start() {
    this.run();
    return this;
  }

  stop() {
    this.stopped = true;
    this.controller?.abort();
  }

  async run() {
    let failures = 0;
    while (!this.stopped) {
      this.controller = new AbortController();
      let silence = null;
      const alive = () => {
        clearTimeout(silence);
        silence = setTimeout(() => this.controller.abort(), SILENCE_MS);
      };
      try {
        const headers = authorization({ Accept: "text/event-stream" });
        if (this.lastEventId !== null) headers["Last-Event-ID"] = this.lastEventId;
        alive();
        const response = await fetch(this.url(), { ...FETCH_OPTIONS, headers, signal: this.controller.signal });
        if (!response.ok) {
          const error = await errorOf(response);
          if (FATAL.has(response.status)) {
            clearTimeout(silence);
            this.stopped = true;
            this.onFatal(error);
            return;
          }
          throw error;
        }
        this.onState("live");
        await readMessages(
          response.body,
          (message) => {
            // Reset the pause only once the stream delivers: an answer that closes at
            // once must not make the loop spin.
            failures = 0;
            if (message.id !== null) this.lastEventId = message.id;
            this.onEvent(message);
          },
          alive,
        );
        clearTimeout(silence);
        if (this.finished()) {
          this.stopped = true;
          this.onState("done");
          return;
        }
      } catch (error) {
        clearTimeout(silence);
        if (this.stopped) return;
        if (error instanceof ApiError && FATAL.has(error.status)) {
          this.stopped = true;
          this.onFatal(error);
          return;
        }
      }
      if (this.stopped) return;
      this.onState("reconnecting");
      failures += 1;
      // 0.25 s, 0.5 s, 1 s, 2 s, then every 3 s, with some jitter so that many
      // consoles do not come back at the same instant.
      const pause = Math.min(3000, 250 * 2 ** (failures - 1)) * (0.8 + 0.4 * Math.random());
      await new Promise((resolve) => setTimeout(resolve, pause));
    }
  }
}

/** The `code` of an `error` event's data (`not_found`, ...), or null. */
export function errorCode(data) {
  try {
    return JSON.parse(data).error.code ?? null;
  } catch {
    return null;
  }
}

/** The text of an `error` event's data (OpenAI's error envelope). */
export function errorText(data) {
  try {
    return JSON.parse(data).error.message;
  } catch {
    return "the stream reported an error";
  }
}
