// Webhook endpoints: their state, recent deliveries with status codes, and the test
// and retry buttons. Read when opened and after each action (no polling).

import { call } from "./api.js";
import { h, replace } from "./dom.js";
import { timestamp } from "./format.js";

/** Renders the endpoints into `root`; returns a function that stops it. */
export function webhooksView(root, context) {
  const message = h("p", { class: "message", role: "alert" });
  const list = h("div", { class: "endpoints" });
  const refresh = h("button", { type: "button", class: "quiet", onclick: () => load() }, "Refresh");
  replace(root, h("h1", {}, "Webhooks"), h("div", { class: "actions" }, refresh), message, list);
  let stopped = false;

  if (!context.me.permissions.includes("manage_webhooks")) {
    message.textContent = `A ${context.me.scope} key cannot manage webhook endpoints (a batches or admin key can).`;
    context.rendered();
  } else {
    load();
  }

  async function load() {
    try {
      const [endpoints, types] = await Promise.all([
        call("GET", "/v1/webhook_endpoints?limit=100"),
        call("GET", "/v1/webhook_event_types"),
      ]);
      if (stopped) return;
      if (endpoints.data.length === 0) {
        replace(list, h("p", {}, "No webhook endpoints. Create one with the API (POST /v1/webhook_endpoints) or `batchd webhooks create`."));
      } else {
        replace(list, endpoints.data.map((endpoint) => endpointCard(endpoint, types.data)));
      }
      context.rendered();
    } catch (error) {
      message.textContent = error.message;
      context.rendered();
    }
  }

  function endpointCard(endpoint, eventTypes) {
    const deliveries = h("div", { class: "deliveries" });
    const result = h("p", { class: "message", role: "status" });
    const type = h(
      "select",
      { id: `test-type-${endpoint.id}`, "aria-label": "Event type of the test" },
      eventTypes.map((t) => h("option", { value: t }, t)),
    );
    const test = h(
      "button",
      {
        type: "button",
        onclick: async () => {
          test.disabled = true;
          result.textContent = "Sending a test event…";
          try {
            const answer = await call("POST", `/v1/webhook_endpoints/${encodeURIComponent(endpoint.id)}/test`, {
              body: { event_type: type.value },
            });
            result.textContent = `Test delivered: the receiver answered ${answer.status_code}.`;
          } catch (error) {
            result.textContent = `Test failed: ${error.message}`;
          } finally {
            test.disabled = false;
          }
        },
      },
      "Send test",
    );
    const show = h(
      "button",
      { type: "button", class: "quiet", "aria-expanded": "false", onclick: () => toggle() },
      "Deliveries",
    );
    async function toggle() {
      const open = show.getAttribute("aria-expanded") === "true";
      show.setAttribute("aria-expanded", String(!open));
      if (open) return replace(deliveries);
      await loadDeliveries();
    }
    async function loadDeliveries() {
      try {
        const page = await call("GET", `/v1/webhook_endpoints/${encodeURIComponent(endpoint.id)}/deliveries?limit=20`);
        replace(deliveries, deliveryTable(endpoint, page.data, loadDeliveries, result));
      } catch (error) {
        result.textContent = error.message;
      }
    }
    return h(
      "article",
      { class: "endpoint", dataset: { endpointId: endpoint.id } },
      h("h2", {}, endpoint.name, " ", h("span", { class: `badge state-${endpoint.status}` }, endpoint.status)),
      h(
        "dl",
        { class: "fields" },
        h("dt", {}, "id"), h("dd", {}, endpoint.id),
        h("dt", {}, "url"), h("dd", {}, endpoint.url),
        h("dt", {}, "events"), h("dd", {}, endpoint.event_types.join(", ")),
        h("dt", {}, "secret"), h("dd", {}, `…${endpoint.signing_secret_hint}`),
        endpoint.disabled_reason && [h("dt", {}, "disabled because"), h("dd", {}, endpoint.disabled_reason)],
        endpoint.failing_since && [h("dt", {}, "failing since"), h("dd", {}, timestamp(endpoint.failing_since))],
      ),
      h("div", { class: "actions" }, h("label", { for: type.id }, "Test event"), type, test, show),
      result,
      deliveries,
    );
  }

  function deliveryTable(endpoint, data, reload, result) {
    if (data.length === 0) return h("p", {}, "No deliveries yet.");
    return h(
      "table",
      { class: "delivery-list" },
      h("thead", {}, h("tr", {}, ["Event", "Batch", "Status", "Attempts", "Answer", "When", ""].map((n) => h("th", { scope: "col" }, n)))),
      h(
        "tbody",
        {},
        data.map((d) => {
          const answer = d.last_attempt
            ? d.last_attempt.status_code ?? d.last_attempt.error ?? "no answer"
            : "not tried yet";
          const retry =
            d.status === "pending"
              ? null
              : h(
                  "button",
                  {
                    type: "button",
                    class: "quiet",
                    onclick: async () => {
                      try {
                        await call("POST", `/v1/webhook_endpoints/${encodeURIComponent(endpoint.id)}/deliveries/${encodeURIComponent(d.id)}/retry`);
                        result.textContent = `Delivery ${d.id} will be sent again.`;
                        await reload();
                      } catch (error) {
                        result.textContent = `Retry refused: ${error.message}`;
                      }
                    },
                  },
                  "Retry",
                );
          return h(
            "tr",
            { dataset: { deliveryId: d.id } },
            h("td", { "data-label": "Event" }, d.event_type),
            h("td", { "data-label": "Batch" }, d.batch_id),
            h("td", { "data-label": "Status" }, d.status),
            h("td", { "data-label": "Attempts" }, d.attempts),
            h("td", { "data-label": "Answer" }, String(answer)),
            h("td", { "data-label": "When" }, timestamp(d.created_at)),
            h("td", {}, retry),
          );
        }),
      ),
    );
  }

  return () => {
    stopped = true;
  };
}
