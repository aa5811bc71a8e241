// The console's entry: asks for an API key once per tab, then routes on the URL's
// fragment: #/batches?<filters> (the list), #/batches/<id> (one batch), #/webhooks.

import { call, session } from "./api.js";
import { h, replace } from "./dom.js";
import { batchesView } from "./batches.js";
import { batchView } from "./batch.js";
import { webhooksView } from "./webhooks.js";

const view = document.getElementById("view");
const nav = document.getElementById("nav");
const live = document.getElementById("live");
const who = document.getElementById("who");
const signOut = document.getElementById("sign-out");

let me = null;
let stopView = () => {};
let routes = 0; // the latest route() call; an older one that resumes after an await gives way
let firstRender = true;

const context = {
  get me() {
    return me;
  },
  navigate(hash) {
    if (location.hash === hash) route();
    else location.hash = hash;
  },
  reload() {
    route();
  },
  setLive(state) {
    const labels = { live: "Live", reconnecting: "Reconnecting…", off: "Not live", done: "Final" };
    live.hidden = false;
    live.dataset.state = state;
    live.textContent = labels[state] ?? state;
  },
  /** A view calls this once its first content is on screen: the first time in this
   * page load, the time since navigation start is kept for the browser tests. */
  rendered() {
    if (!firstRender) return;
    firstRender = false;
    document.documentElement.dataset.firstRenderMs = String(Math.round(performance.now()));
  },
};

signOut.addEventListener("click", () => {
  session.forget();
  me = null;
  route();
});
window.addEventListener("hashchange", route);
route();

async function route() {
  const turn = ++routes;
  stopView();
  stopView = () => {};
  live.hidden = true;
  if (!session.key) return askForKey();
  if (!me) {
    try {
      const answer = await call("GET", "/v1/me");
      if (turn !== routes) return;
      me = answer;
    } catch (error) {
      if (turn !== routes) return;
      if (error.status === 401) {
        session.forget();
        return askForKey(`batchd refused this key: ${error.message}`);
      }
      replace(view, h("p", { class: "message", role: "alert" }, error.message));
      return;
    }
  }
  nav.hidden = false;
  who.hidden = false;
  signOut.hidden = false;
  who.textContent = `${me.user_id} · ${me.scope}${me.sees_all_owners ? " (all owners)" : ""}`;
  const [path, search = ""] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean);
  let batchId = null;
  try {
    batchId = parts[1] ? decodeURIComponent(parts[1]) : null;
  } catch {
    replace(view, h("p", { class: "message", role: "alert" }, "This link is malformed."));
    return;
  }
  const section = parts[0] === "webhooks" ? "webhooks" : "batches";
  for (const link of nav.querySelectorAll("a")) {
    if (link.dataset.section === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (section === "webhooks") stopView = webhooksView(view, context);
  else if (batchId) stopView = batchView(view, context, batchId);
  else stopView = batchesView(view, context, search);
  document.title = batchId ? `${batchId} · batchd` : `${section} · batchd`;
  // A new view: keyboard and screen reader users start at its content.
  if (document.activeElement === document.body || !view.contains(document.activeElement)) view.focus();
}

// The skip link moves focus; it must not change the fragment (the route).
document.querySelector(".skip").addEventListener("click", (event) => {
  event.preventDefault();
  view.focus();
});

function askForKey(problem = "") {
  nav.hidden = true;
  who.hidden = true;
  signOut.hidden = true;
  const input = h("input", {
    id: "api-key",
    name: "api-key",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    "aria-describedby": "api-key-help",
  });
  const error = h("p", { class: "message", role: "alert", id: "key-error" }, problem);
  const form = h(
    "form",
    {
      class: "key-form",
      onsubmit: (event) => {
        event.preventDefault();
        const key = input.value.trim();
        if (!key) {
          error.textContent = "Enter an API key.";
          return;
        }
        session.remember(key);
        me = null;
        route();
      },
    },
    h("h1", {}, "Open the console"),
    h("label", { for: "api-key" }, "API key"),
    input,
    h(
      "p",
      { id: "api-key-help", class: "help" },
      "The key batchd printed at its first start, or one from `batchd keys create`. It is kept in this tab only, until the tab closes.",
    ),
    h("button", { type: "submit" }, "Open"),
    error,
  );
  replace(view, form);
  input.focus();
}
