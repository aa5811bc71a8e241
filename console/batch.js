// One batch: every field, its metadata, errors and usage, its timeline (each version:
// when, and what changed), live through the batch's own watch stream, cancel for keys
// that may cancel a running batch and delete for keys that may delete a finished one.
// A batch deleted while the page shows it is said to be gone; its last state stays.

import { call, filterQuery } from "./api.js";
import { h, replace, badge, progressBar, stalledBadge } from "./dom.js";
import { age, count, expiresIn, fromNow, rateText, stalledFor, timestamp } from "./format.js";
import { EventStream, errorCode, errorText } from "./stream.js";

const CANCELLABLE = new Set(["validating", "in_progress", "finalizing"]);
const TERMINAL = new Set(["completed", "failed", "expired", "cancelled"]);
const TIMES = [
  "created_at",
  "in_progress_at",
  "expires_at",
  "finalizing_at",
  "completed_at",
  "failed_at",
  "expired_at",
  "cancelling_at",
  "cancelled_at",
  "updated_at",
  "stalled_at",
  "estimated_completion_at",
];
/** Most versions the timeline keeps (a batch reporting progress often has thousands);
 * the oldest are dropped first. */
const MAX_TIMELINE = 500;
/** Shown in sections of their own, not in the field list. */
const SECTIONS = new Set(["metadata", "errors", "usage", "request_counts"]);

/** Renders batch `id` into `root`; returns a function that stops it. */
export function batchView(root, context, id) {
  let current = null;
  let deleted = false;
  const versions = new Map(); // version -> batch, for the timeline
  const heading = h("h1", { class: "batch-id" }, id);
  const summary = h("div", { class: "summary" });
  const actions = h("div", { class: "actions" });
  const message = h("p", { class: "message", role: "alert", tabindex: "-1" });
  const fields = h("dl", { class: "fields" });
  const metadata = h("section", { "aria-labelledby": "metadata-heading" });
  const errors = h("section", { "aria-labelledby": "errors-heading" });
  const usage = h("section", { "aria-labelledby": "usage-heading" });
  const timeline = h("ol", { class: "timeline", reversed: true });
  replace(
    root,
    h("p", {}, h("a", { href: "#/batches" }, "← All batches")),
    heading,
    summary,
    actions,
    message,
    h("div", { class: "columns" },
      h("section", { "aria-labelledby": "fields-heading" }, h("h2", { id: "fields-heading" }, "Fields"), fields),
      h("div", {}, metadata, usage, errors),
    ),
    h("section", { "aria-labelledby": "timeline-heading" }, h("h2", { id: "timeline-heading" }, "Timeline"), timeline),
  );

  let stream = null;
  let deletion = null; // follows the change feed once the watch has ended
  let stopped = false;
  let timelineFrame = null;
  const ticker = setInterval(() => current && renderSummary(), 1000);
  call("GET", `/v1/batches/${encodeURIComponent(id)}`)
    .then((batch) => {
      if (stopped) return;
      show(batch);
      context.rendered();
      // The whole history the event log still holds, then every new version; the
      // stream ends by itself after the terminal status.
      stream = new EventStream({
        url: () => `/v1/batches/${encodeURIComponent(id)}/watch?after_version=0`,
        onEvent: (event) => {
          if (event.event === "error") {
            // A watch whose batch is deleted ends with not_found.
            if (errorCode(event.data) === "not_found") showDeleted();
            else message.textContent = errorText(event.data);
            return;
          }
          if (event.event !== "snapshot" && event.event !== "change") return;
          let next;
          try {
            next = JSON.parse(event.data);
          } catch {
            message.textContent = "batchd sent a version this page cannot read.";
            return;
          }
          if (!versions.has(next.version)) {
            versions.set(next.version, { batch: next, kind: event.event });
            if (versions.size > MAX_TIMELINE) versions.delete(Math.min(...versions.keys()));
            // A long history arrives at once: draw the timeline once per frame.
            timelineFrame ??= requestAnimationFrame(() => {
              timelineFrame = null;
              renderTimeline();
            });
          }
          if (next.version > current.version) show(next);
        },
        onState: (state) => {
          context.setLive(state);
          if (state === "done") followDeletion();
        },
        onFatal: (error) => {
          // The batch was read a moment ago: gone now means deleted.
          if (error.status === 404) return showDeleted();
          context.setLive("off");
          message.textContent = `Live updates stopped: ${error.message}`;
        },
        finished: () => TERMINAL.has(current.status),
      }).start();
    })
    .catch((error) => {
      message.textContent = error.status === 404 ? `No batch ${id} that this key can see.` : error.message;
    });

  function show(batch) {
    const statusChanged = current?.status !== batch.status;
    current = batch;
    renderSummary();
    // Only when the status moves: a progress update must not undo a confirmation.
    if (statusChanged) renderActions();
    renderFields();
  }

  /** A watch ends after the terminal status, and only then can a batch be deleted:
   * from then on the change feed, narrowed to the second the batch was created in,
   * says when it is. The batch is read once the feed has started, for a deletion
   * just before (and again if the feed lost its place, 410). */
  function followDeletion() {
    if (stopped || deleted) return;
    const second = current.created_at;
    const filters = { created_after: second, created_before: second + 1 };
    deletion = new EventStream({
      url: () => `/v1/batch_events?${filterQuery(filters, { withStatus: false, withStalled: false, withPaging: false })}`,
      onEvent: (event) => {
        if (event.event === "synced") {
          call("GET", `/v1/batches/${encodeURIComponent(id)}`).catch((error) => {
            if (error.status === 404) showDeleted();
          });
        } else if (event.event === "deleted") {
          let data;
          try {
            data = JSON.parse(event.data);
          } catch {
            return;
          }
          if (data.batch_id === id) showDeleted();
        }
      },
      onFatal: (error) => {
        if (error.status === 410) followDeletion();
      },
    }).start();
  }

  /** The batch is gone: nothing can be done to it any more, and what the page still
   * shows is said to be its last state. */
  function showDeleted() {
    if (stopped || deleted) return;
    deleted = true;
    stream?.stop();
    deletion?.stop();
    context.setLive("off");
    renderSummary();
    replace(actions);
    message.textContent = `Batch ${id} was deleted. What this page shows is its last state.`;
  }

  function renderSummary() {
    const counts = current.request_counts;
    const stalledAt = deleted ? null : (current.stalled_at ?? null);
    const stalled = stalledAt === null ? null : stalledBadge(stalledFor(stalledAt), `marked stalled at ${timestamp(stalledAt)}`);
    if (stalled) summary.dataset.stalled = "true";
    else delete summary.dataset.stalled;
    const eta = current.estimated_completion_at ?? null;
    // Rate and ETA are batchd's estimate, which it makes only while the batch runs.
    const running = !deleted && current.status === "in_progress";
    replace(
      summary,
      badge(deleted ? "deleted" : current.status),
      stalled,
      progressBar(counts),
      h(
        "span",
        { class: "progress-text" },
        `${count(counts.completed)} completed + ${count(counts.failed)} failed of ${count(counts.total)}`,
      ),
      running && h("span", { class: "rate" }, `rate ${rateText(current.progress_rate)}`),
      running && h("span", { class: "eta", title: eta === null ? null : timestamp(eta) }, `ETA ${fromNow(eta)}`),
      h("span", {}, `created ${age(current.created_at)}`),
      h("span", {}, `expires ${expiresIn(current)}`),
    );
  }

  /** Cancel while the batch runs, delete once it has finished (never both), each only
   * for a key that may. */
  function renderActions() {
    const permissions = context.me.permissions;
    if (deleted) replace(actions);
    else if (permissions.includes("cancel_batches") && CANCELLABLE.has(current.status)) {
      offer("Cancel batch", `Cancel ${current.id}?`, "Yes, cancel it", cancel);
    } else if (permissions.includes("delete_batches") && TERMINAL.has(current.status)) {
      offer("Delete batch", `Delete ${current.id} and everything batchd keeps of it?`, "Yes, delete it", remove);
    } else replace(actions);
  }

  /** A button that asks on the page before `act(button)` runs. */
  function offer(label, question, yesLabel, act) {
    const ask = h("button", { type: "button", class: "danger", onclick: () => confirm() }, label);
    replace(actions, ask);
    function confirm() {
      const yes = h("button", { type: "button", class: "danger", onclick: () => act(yes) }, yesLabel);
      const no = h("button", { type: "button", class: "quiet", onclick: () => renderActions() }, "Keep it");
      replace(actions, h("span", {}, question), yes, no);
      yes.focus();
    }
  }

  async function cancel(button) {
    button.disabled = true;
    try {
      const batch = await call("POST", `/v1/batches/${encodeURIComponent(current.id)}/cancel`);
      if (batch.version > current.version) show(batch);
      else renderActions();
      message.textContent = `Cancellation of ${batch.id} requested.`;
      message.focus();
    } catch (error) {
      message.textContent = `Cancel refused: ${error.message}`;
      renderActions();
    }
  }

  async function remove(button) {
    button.disabled = true;
    try {
      await call("DELETE", `/v1/batches/${encodeURIComponent(current.id)}`);
      showDeleted();
    } catch (error) {
      if (error.status === 404) showDeleted();
      else {
        message.textContent = `Delete refused: ${error.message}`;
        renderActions();
      }
    }
    message.focus();
  }

  function renderFields() {
    const items = [];
    for (const [name, value] of Object.entries(current)) {
      if (SECTIONS.has(name)) continue;
      let text;
      if (value === null || value === undefined) text = "null";
      else if (TIMES.includes(name)) text = `${timestamp(value)} (${value})`;
      else if (typeof value === "object") text = JSON.stringify(value);
      else text = String(value);
      items.push(h("dt", {}, name), h("dd", { dataset: { field: name } }, text));
    }
    const counts = current.request_counts;
    items.push(
      h("dt", {}, "request_counts"),
      h("dd", { dataset: { field: "request_counts" } }, `total ${counts.total}, completed ${counts.completed}, failed ${counts.failed}`),
    );
    replace(fields, items);

    const pairs = Object.entries(current.metadata ?? {});
    replace(
      metadata,
      h("h2", { id: "metadata-heading" }, "Metadata"),
      pairs.length === 0
        ? h("p", {}, "None.")
        : h("table", { class: "pairs" },
            h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Key"), h("th", { scope: "col" }, "Value"))),
            h("tbody", {}, pairs.map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {}, v)))),
          ),
    );
    const u = current.usage;
    replace(
      usage,
      h("h2", { id: "usage-heading" }, "Usage"),
      u
        ? h("dl", { class: "fields" },
            h("dt", {}, "input tokens"), h("dd", {}, count(u.input_tokens)),
            h("dt", {}, "cached input tokens"), h("dd", {}, count(u.input_tokens_details?.cached_tokens)),
            h("dt", {}, "output tokens"), h("dd", {}, count(u.output_tokens)),
            h("dt", {}, "reasoning tokens"), h("dd", {}, count(u.output_tokens_details?.reasoning_tokens)),
            h("dt", {}, "total tokens"), h("dd", {}, count(u.total_tokens)),
          )
        : h("p", {}, "Not reported yet."),
    );
    const list = current.errors?.data ?? [];
    replace(
      errors,
      h("h2", { id: "errors-heading" }, `Errors (${list.length})`),
      list.length === 0
        ? h("p", {}, "None.")
        : h("table", { class: "errors" },
            h("thead", {}, h("tr", {}, ["Code", "Line", "Message", "Param"].map((n) => h("th", { scope: "col" }, n)))),
            h("tbody", {}, list.map((e) => h("tr", {}, h("td", {}, e.code), h("td", {}, e.line ?? "—"), h("td", {}, e.message), h("td", {}, e.param ?? "—")))),
          ),
    );
  }

  function renderTimeline() {
    const ordered = [...versions.values()].sort((a, b) => b.batch.version - a.batch.version);
    replace(
      timeline,
      ordered.map(({ batch, kind }) => {
        const previous = versions.get(batch.version - 1)?.batch;
        const when = batch.version === 1 ? batch.created_at : batch.updated_at;
        let what;
        if (batch.version === 1) what = [h("li", {}, `created, ${batch.status}`)];
        else if (!previous) {
          what = [h("li", {}, kind === "snapshot" ? "state at this version (earlier versions are no longer kept)" : "changed (the previous version is not kept)")];
        } else what = changes(previous, batch).map(([path, from, to]) => h("li", {}, h("code", {}, path), `: ${from} → ${to}`));
        return h(
          "li",
          { dataset: { version: batch.version } },
          h("span", { class: "version" }, `v${batch.version}`),
          " ",
          h("time", {}, timestamp(when)),
          " ",
          badge(batch.status),
          h("ul", { class: "changes" }, what),
        );
      }),
    );
  }

  return () => {
    stopped = true;
    stream?.stop();
    deletion?.stop();
    if (timelineFrame !== null) cancelAnimationFrame(timelineFrame);
    clearInterval(ticker);
  };
}

/** The fields that differ between two versions, as [path, from, to] in text. */
function changes(before, after) {
  const out = [];
  const skip = new Set(["version", "updated_at"]);
  const walk = (path, a, b) => {
    if (skip.has(path)) return;
    const objects = a && b && typeof a === "object" && typeof b === "object" && !Array.isArray(a) && !Array.isArray(b);
    if (objects) {
      for (const key of new Set([...Object.keys(a), ...Object.keys(b)])) walk(path ? `${path}.${key}` : key, a[key], b[key]);
      return;
    }
    const text = (v) => (v === null || v === undefined ? "null" : typeof v === "object" ? JSON.stringify(v) : String(v));
    if (text(a) !== text(b)) out.push([path, text(a), text(b)]);
  };
  walk("", before, after);
  return out;
}
