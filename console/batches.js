// The list of batches: counts per status, filters kept in the URL, a page of rows, and
// the change feed keeping all of it live. The feed is opened first and the page read
// only once it has said where it starts (`synced`), so no change falls between the two;
// a change the page already shows (same or older version) is ignored, and a deleted
// batch leaves the rows and the counts. The feed is not narrowed by status or
// stall (it refuses `stalled`): the page sorts its changes into the filters itself.

import { call, filterQuery, parseFilters } from "./api.js";
import { h, replace, badge, progressBar, stalledBadge } from "./dom.js";
import { age, count, expiresIn, fromNow, rateText, stalledFor, timestamp } from "./format.js";
import { EventStream, errorText } from "./stream.js";

export const STATUSES = [
  "validating",
  "in_progress",
  "finalizing",
  "completed",
  "failed",
  "expired",
  "cancelling",
  "cancelled",
];

/** The page size when the URL does not say. */
const PAGE_SIZE = 20;

/** Most batches whose last known status the page keeps (to move counts between
 * statuses); beyond it the oldest are forgotten and counts are read again instead. */
const MAX_KNOWN = 50_000;

/** How long the list waits for the feed to start before it is read anyway (without
 * live updates, said on the page). */
const FEED_START_MS = 3000;

/** The filters the change feed takes, and those the counts take (per status, so not
 * the status filter). */
const FEED_QUERY = { withStatus: false, withStalled: false, withPaging: false };
const COUNTS_QUERY = { withStatus: false, withPaging: false };

/** Renders the list into `root`; returns a function that stops it. */
export function batchesView(root, context, search) {
  const filters = parseFilters(search);
  const limit = Number(filters.limit) || PAGE_SIZE;
  const firstPage = !filters.after;
  const rows = new Map(); // id -> { batch, element, cells, stalled (its badge) }
  const known = new Map(); // id -> { status, version, stalled }
  let counts = null;
  let countsRefresh = null;
  let countsEpoch = 0; // changes applied to the counts, or that made them be read again
  let stopped = false;
  let loading = false; // the page and counts are being read
  let listed = false; // they have been: changes apply directly
  let hasMore = false;
  const pending = [];

  const countsBar = h("ul", { class: "counts", "aria-label": filters.stalled ? "Stalled batches per status" : "Batches per status" });
  const message = h("p", { class: "message", role: "alert" });
  const body = h("tbody");
  const pager = h("nav", { class: "pager", "aria-label": "Pages" });
  const table = h(
    "table",
    { class: "batches" },
    h("caption", { class: "visually-hidden" }, "Batches, newest first"),
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ["Batch", "Endpoint", "Model", "Job", "Status", "Progress", "Rate", "ETA", "Age", "Expires"].map((name) =>
          h("th", { scope: "col" }, name),
        ),
      ),
    ),
    body,
  );
  replace(
    root,
    h("h1", {}, "Batches"),
    countsBar,
    filterForm(filters, context),
    message,
    table,
    pager,
  );

  const feed = new EventStream({
    url: () => `/v1/batch_events?${filterQuery(filters, FEED_QUERY)}`,
    onEvent: (event) => {
      if (event.event === "error") return showError(errorText(event.data));
      if (!listed) {
        // Until the page is on screen, changes wait (the page may already hold them).
        if (event.event === "synced") {
          if (loading) showError("Live updates are connected; changes made before this may be missing, reload to be sure.");
          loadPage();
        } else pending.push(event);
        return;
      }
      applyEvent(event);
    },
    onState: (state) => context.setLive(state),
    onFatal: (error) => {
      if (error.status === 410) {
        // The feed no longer holds our cursor: read everything again.
        context.reload();
        return;
      }
      context.setLive("off");
      showError(`Live updates stopped: ${error.message}`);
      loadPage();
    },
  }).start();
  const fallback = setTimeout(() => {
    if (!loading) {
      showError("Live updates are not connected yet; the page may fall behind.");
      loadPage();
    }
  }, FEED_START_MS);
  const ticker = setInterval(tick, 1000);

  async function loadPage() {
    if (loading) return;
    loading = true;
    clearTimeout(fallback);
    try {
      const [page, totals] = await Promise.all([
        call("GET", `/v1/batches?${filterQuery({ ...filters, limit })}`),
        call("GET", `/v1/batch_counts?${filterQuery(filters, COUNTS_QUERY)}`),
      ]);
      counts = totals;
      hasMore = page.has_more;
      for (const batch of page.data) {
        remember(batch);
        const row = makeRow(batch);
        rows.set(batch.id, row);
        body.append(row.element);
      }
      renderCounts();
      renderPager();
      if (page.data.length === 0) showEmpty();
      listed = true;
      // Changes that arrived while reading may be in the counts already, or not: if
      // any moved a count, the counts are read again once they have been applied.
      const epoch = countsEpoch;
      for (const event of pending.splice(0)) applyEvent(event);
      if (countsEpoch !== epoch) refreshCounts();
      context.rendered();
    } catch (error) {
      showError(error.message);
    }
  }

  function applyEvent(event) {
    if (!["change", "left_filter", "initial", "deleted"].includes(event.event)) return;
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    if (event.event === "deleted") return applyDeletion(data.batch_id);
    const batch = data.batch;
    if (!batch) return;
    const before = known.get(batch.id);
    if (before && before.version >= batch.version) return;
    moveCount(before, batch);
    remember(batch);
    const row = rows.get(batch.id);
    const shown = matchesFilters(batch) && event.event !== "left_filter";
    if (row && shown) updateRow(row, batch);
    else if (row) dropRow(batch.id);
    else if (shown && belongsOnPage(batch)) insertRow(batch);
  }

  /** A deleted batch carries only its id: its last known status says which count
   * loses it; a batch this page never saw makes the counts be read again. */
  function applyDeletion(id) {
    if (typeof id !== "string") return;
    const before = known.get(id);
    known.delete(id);
    if (counts) {
      if (!before) recount();
      else if (counted(before.stalled)) {
        countsEpoch += 1;
        counts.counts[before.status] -= 1;
        counts.total -= 1;
        renderCounts();
      }
    }
    if (rows.has(id)) dropRow(id);
  }

  function remember(batch) {
    known.delete(batch.id);
    known.set(batch.id, { status: batch.status, version: batch.version, stalled: isStalled(batch) });
    if (known.size > MAX_KNOWN) known.delete(known.keys().next().value);
  }

  /** Whether a batch that is (or is not) stalled is in the counts: under the stalled
   * filter only stalled ones are. */
  function counted(stalled) {
    return !filters.stalled || stalled;
  }

  function moveCount(before, batch) {
    if (!counts) return;
    const stalled = isStalled(batch);
    if (before) {
      if (counted(before.stalled) !== counted(stalled)) {
        // Under the stalled filter a batch became stalled, or stopped being: the
        // counts are read again rather than worked out from what this page saw.
        recount();
        return;
      }
      if (!counted(stalled) || before.status === batch.status) return;
      countsEpoch += 1;
      counts.counts[before.status] -= 1;
      counts.counts[batch.status] += 1;
    } else if (batch.version === 1) {
      if (!counted(stalled)) return;
      countsEpoch += 1;
      counts.counts[batch.status] += 1;
      counts.total += 1;
    } else {
      // A batch this page never saw changed: its previous status is unknown here,
      // so the counts are read again (once, for any number of such changes).
      recount();
      return;
    }
    renderCounts();
  }

  /** A change the page cannot move the counts by: they are read again, and once more
   * if a read was already under way (it may have been answered before the change). */
  function recount() {
    countsEpoch += 1;
    refreshCounts();
  }

  function refreshCounts() {
    if (countsRefresh) return;
    countsRefresh = setTimeout(async () => {
      const epoch = countsEpoch;
      try {
        counts = await call("GET", `/v1/batch_counts?${filterQuery(filters, COUNTS_QUERY)}`);
        renderCounts();
      } catch (error) {
        showError(error.message);
      } finally {
        countsRefresh = null;
      }
      // Changes applied while the counts were read may or may not be in them: read
      // again (this settles as soon as a read sees no change meanwhile).
      if (countsEpoch !== epoch && !stopped) refreshCounts();
    }, 1000);
  }

  /** Whether a batch passes the filters the feed does not apply: status and stall. */
  function matchesFilters(batch) {
    if (filters.status.length > 0 && !filters.status.includes(batch.status)) return false;
    return !filters.stalled || isStalled(batch);
  }

  /** Whether a batch the page does not show belongs on it: on the first page, newest
   * first, anything created since the oldest row shown (or any, if not full). */
  function belongsOnPage(batch) {
    if (!firstPage) return false;
    if (rows.size < limit && !hasMore) return true;
    if (rows.size === 0) return false;
    const oldest = [...rows.values()].at(-1).batch;
    return batch.created_at >= oldest.created_at;
  }

  function insertRow(batch) {
    body.querySelector("tr.empty")?.remove();
    const row = makeRow(batch);
    // Newest first, as batchd lists them (in the order they were created, which
    // `created_at`, in whole seconds, cannot tell apart within a second). A batch the
    // feed announces as just created (version 1) is newer than every row shown, so it
    // goes first; any other goes before the first row created earlier than itself.
    const next =
      batch.version === 1
        ? ([...rows.values()][0] ?? null)
        : ([...rows.values()].find((other) => other.batch.created_at < batch.created_at) ?? null);
    const ordered = [...rows];
    const at = next ? ordered.findIndex(([, other]) => other === next) : ordered.length;
    ordered.splice(at, 0, [batch.id, row]);
    rows.clear();
    for (const [id, other] of ordered) rows.set(id, other);
    body.insertBefore(row.element, next ? next.element : null);
    while (rows.size > limit) {
      removeRow([...rows.keys()].at(-1));
      hasMore = true;
      renderPager();
    }
  }

  function removeRow(id) {
    rows.get(id)?.element.remove();
    rows.delete(id);
  }

  /** A row leaves the page (its batch was deleted or left the filters). */
  function dropRow(id) {
    removeRow(id);
    if (rows.size > 0) {
      // The "Older" link pages after the last row shown, which must still exist.
      renderPager();
    } else if (hasMore) {
      // Every row shown is gone but older batches remain: read the page again.
      context.reload();
    } else showEmpty();
  }

  function makeRow(batch) {
    const cells = {
      id: h("td", { class: "id", "data-label": "Batch" }),
      endpoint: h("td", { "data-label": "Endpoint" }),
      model: h("td", { "data-label": "Model" }),
      job: h("td", { "data-label": "Job" }),
      status: h("td", { class: "status", "data-label": "Status" }),
      progress: h("td", { class: "progress-cell", "data-label": "Progress" }),
      rate: h("td", { class: "rate", "data-label": "Rate" }),
      eta: h("td", { class: "eta", "data-label": "ETA" }),
      age: h("td", { class: "age", "data-label": "Age" }),
      expires: h("td", { class: "expires", "data-label": "Expires" }),
    };
    const element = h("tr", { dataset: { batchId: batch.id } }, Object.values(cells));
    const row = { batch, element, cells, stalled: null };
    fillRow(row, true);
    return row;
  }

  function updateRow(row, batch) {
    row.batch = batch;
    fillRow(row, false);
  }

  function fillRow(row, first) {
    const { batch, cells } = row;
    const counts = batch.request_counts ?? { total: 0, completed: 0, failed: 0 };
    row.element.dataset.status = batch.status;
    row.element.dataset.version = batch.version;
    if (isStalled(batch)) row.element.dataset.stalled = "true";
    else delete row.element.dataset.stalled;
    if (first) {
      replace(cells.id, h("a", { href: `#/batches/${encodeURIComponent(batch.id)}` }, batch.id));
    }
    replace(cells.endpoint, batch.endpoint);
    replace(cells.model, batch.model ?? "—");
    replace(cells.job, batch.job_id ?? "—");
    row.stalled = isStalled(batch) ? stalledBadge(stalledFor(batch.stalled_at), `marked stalled at ${timestamp(batch.stalled_at)}`) : null;
    // One element in the cell, so that the phone layout keeps both badges beside the label.
    replace(cells.status, h("span", { class: "badges" }, badge(batch.status), row.stalled));
    replace(
      cells.progress,
      progressBar(counts),
      h("span", { class: "progress-text" }, `${count(counts.completed)} + ${count(counts.failed)} failed / ${count(counts.total)}`),
    );
    // batchd's own estimate, as of this version: null while it has none.
    cells.rate.textContent = rateText(batch.progress_rate);
    const eta = batch.estimated_completion_at ?? null;
    if (eta === null) cells.eta.removeAttribute("title");
    else cells.eta.title = timestamp(eta);
    tickRow(row);
  }

  /** The texts that move with the clock. */
  function tickRow(row) {
    if (row.stalled) row.stalled.textContent = stalledFor(row.batch.stalled_at);
    row.cells.eta.textContent = fromNow(row.batch.estimated_completion_at);
    row.cells.age.textContent = age(row.batch.created_at);
    row.cells.age.title = timestamp(row.batch.created_at);
    row.cells.expires.textContent = expiresIn(row.batch);
  }

  function tick() {
    for (const row of rows.values()) tickRow(row);
  }

  function renderCounts() {
    if (!counts) return;
    if (countsBar.childElementCount === 0) {
      const link = (status) => {
        const query = filterQuery({ ...filters, status: status ? [status] : [], after: "" });
        return `#/batches${query ? `?${query}` : ""}`;
      };
      const selected = filters.status.length === 1 ? filters.status[0] : null;
      replace(
        countsBar,
        h(
          "li",
          {},
          h(
            "a",
            { href: link(null), "aria-current": filters.status.length === 0 ? "page" : null, dataset: { count: "all" } },
            h("span", { class: "count-name" }, "all"),
            h("span", { class: "count-value" }),
          ),
        ),
        STATUSES.map((status) =>
          h(
            "li",
            {},
            h(
              "a",
              { href: link(status), "aria-current": selected === status ? "page" : null, dataset: { count: status } },
              badge(status),
              h("span", { class: "count-value" }),
            ),
          ),
        ),
      );
    }
    for (const value of countsBar.querySelectorAll("a")) {
      const name = value.dataset.count;
      value.querySelector(".count-value").textContent = count(name === "all" ? counts.total : counts.counts[name]);
    }
  }

  function renderPager() {
    const links = [];
    if (!firstPage) {
      links.push(h("a", { href: `#/batches?${filterQuery({ ...filters, after: "" })}` }, "← Newest"));
    }
    const last = [...rows.values()].at(-1);
    if (hasMore && last) {
      links.push(h("a", { href: `#/batches?${filterQuery({ ...filters, after: last.batch.id })}`, rel: "next" }, "Older →"));
    }
    replace(pager, links);
  }

  function showEmpty() {
    body.append(h("tr", { class: "empty" }, h("td", { colspan: 10 }, "No batches match.")));
  }

  function showError(text) {
    message.textContent = text;
  }

  return () => {
    stopped = true;
    feed.stop();
    clearTimeout(fallback);
    clearTimeout(countsRefresh);
    clearInterval(ticker);
  };
}

/** The filter form; applying it changes the URL, which re-renders the list. */
function filterForm(filters, context) {
  const status = h(
    "select",
    { id: "filter-status", name: "status" },
    h("option", { value: "" }, "any"),
    STATUSES.map((s) => h("option", { value: s, selected: filters.status.length === 1 && filters.status[0] === s }, s)),
  );
  const job = h("input", { id: "filter-job", name: "job_id", value: filters.job_id, autocomplete: "off", spellcheck: "false" });
  const metadata = h("input", {
    id: "filter-metadata",
    name: "metadata",
    value: filters.metadata.map(([k, v]) => `${k}=${v}`).join(", "),
    placeholder: "team=search, env=prod",
    autocomplete: "off",
    spellcheck: "false",
  });
  const stalled = h("input", { id: "filter-stalled", name: "stalled", type: "checkbox", checked: filters.stalled });
  const after = h("input", { id: "filter-after", name: "created_after", type: "datetime-local", value: toLocalInput(filters.created_after) });
  const before = h("input", { id: "filter-before", name: "created_before", type: "datetime-local", value: toLocalInput(filters.created_before) });
  const problem = h("p", { class: "message", role: "alert" });
  const field = (label, input) => h("div", { class: "field" }, h("label", { for: input.id }, label), input);
  const form = h(
    "form",
    {
      class: "filters",
      "aria-label": "Filters",
      onsubmit: (event) => {
        event.preventDefault();
        const pairs = [];
        for (const part of metadata.value.split(",").map((p) => p.trim()).filter(Boolean)) {
          const at = part.indexOf("=");
          if (at <= 0) {
            problem.textContent = `Metadata filter "${part}" is not key=value.`;
            metadata.focus();
            return;
          }
          pairs.push([part.slice(0, at).trim(), part.slice(at + 1).trim()]);
        }
        const query = filterQuery({
          status: status.value ? [status.value] : [],
          job_id: job.value.trim(),
          metadata: pairs,
          created_after: fromLocalInput(after.value),
          created_before: fromLocalInput(before.value),
          stalled: stalled.checked,
        });
        context.navigate(`#/batches${query ? `?${query}` : ""}`);
      },
    },
    field("Status", status),
    field("Job", job),
    field("Metadata", metadata),
    field("Created from", after),
    field("Created before", before),
    h("div", { class: "field check" }, stalled, h("label", { for: stalled.id }, "Stalled only")),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Apply"), h("a", { href: "#/batches", class: "button quiet" }, "Clear")),
    problem,
  );
  // Open on wide screens and whenever a filter is set; folded on a phone otherwise.
  const active =
    filters.status.length + filters.metadata.length > 0 || filters.job_id || filters.created_after || filters.created_before || filters.stalled;
  const open = Boolean(active) || window.matchMedia("(min-width: 761px)").matches;
  return h("details", { class: "filter-panel", open }, h("summary", {}, active ? "Filters (active)" : "Filters"), form);
}

/** Whether batchd has marked a batch stalled (its next change clears the mark). */
function isStalled(batch) {
  return batch.stalled_at !== null && batch.stalled_at !== undefined;
}

function toLocalInput(unixSeconds) {
  if (!unixSeconds) return "";
  const d = new Date(Number(unixSeconds) * 1000);
  if (Number.isNaN(d.getTime())) return "";
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function fromLocalInput(value) {
  if (!value) return "";
  const ms = new Date(value).getTime();
  return Number.isNaN(ms) ? "" : String(Math.floor(ms / 1000));
}

