// Building the page: every element is made with createElement and every value a
// client sent (ids, metadata, remarks, errors) is set as text, never parsed as HTML.

/** An element: `h("a", { href: "#/x", class: "y" }, "text", child, ...)`. Attributes
 * named `on*` take a function (a listener); `null`, `undefined` and `false` children
 * and attributes are left out; anything else becomes a text node. */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(element.dataset, value);
    } else {
      element.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(element, children);
  return element;
}

/** Appends children (elements, or anything else as text) to `parent`. */
export function append(parent, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    parent.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return parent;
}

/** Replaces every child of `parent`. */
export function replace(parent, ...children) {
  parent.replaceChildren();
  return append(parent, children);
}

/** The status badge of a batch. */
export function badge(status) {
  return h("span", { class: `badge status-${status}`, dataset: { status } }, status.replace("_", " "));
}

/** The "stalled for 14m" badge beside the status of a batch batchd marked stalled.
 * The text comes from the caller (format.js's `stalledFor`, which a view's ticker
 * keeps current): this module imports none, as batchd hashes it first (src/console.rs). */
export function stalledBadge(text, title) {
  return h("span", { class: "badge stalled", title }, text);
}

/** A progress bar of completed and failed requests over the total. */
export function progressBar(counts) {
  const total = counts?.total ?? 0;
  const completed = counts?.completed ?? 0;
  const failed = counts?.failed ?? 0;
  const done = completed + failed;
  const percent = (n) => (total > 0 ? Math.min(100, (100 * n) / total) : 0);
  const bar = h(
    "div",
    {
      class: "progress",
      role: "progressbar",
      "aria-valuemin": 0,
      "aria-valuemax": total,
      "aria-valuenow": done,
      "aria-label": `${done} of ${total} requests done, ${failed} failed`,
    },
    h("span", { class: "completed" }),
    h("span", { class: "failed" }),
  );
  // Widths through the CSSOM: allowed by a style-src without 'unsafe-inline'.
  bar.children[0].style.width = `${percent(completed)}%`;
  bar.children[1].style.width = `${percent(failed)}%`;
  return bar;
}
