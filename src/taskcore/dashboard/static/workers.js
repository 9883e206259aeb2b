// The workers page: every worker with all its metrics.
"use strict";

(() => {
  let clockOffset = 0;

  function cell(text, cls) {
    return TC.el("td", cls ? { class: cls } : {}, text);
  }

  function render(msg) {
    if (typeof msg.now === "number") clockOffset = msg.now - Date.now() / 1000;
    const data = msg.workers;
    const now = Date.now() / 1000 + clockOffset;
    const list = [...data.workers].sort((a, b) => String(a.name).localeCompare(String(b.name), "en", { numeric: true }));
    TC.setText("workers-hint", data.total > list.length
      ? `${list.length} of ${data.total} shown (the first ${data.limit})` : `${data.total} connected`);
    const body = document.querySelector("#workers-table tbody");
    if (!list.length) {
      body.replaceChildren(TC.el("tr", {}, TC.el("td", { colspan: "17", class: "empty" }, "No workers connected")));
      return;
    }
    body.replaceChildren(...list.map(w => {
      const m = w.metrics || {};
      const link = w.metrics_path
        ? TC.el("a", { href: w.metrics_path, target: "_blank", rel: "noopener" }, "metrics")
        : TC.el("span", { style: "color:#98a2b3" }, "–");
      return TC.el("tr", { "data-worker": w.address },
        TC.el("td", {}, TC.el("div", { class: "wname" }, w.name),
              TC.el("div", { class: "waddr" }, w.address)),
        TC.el("td", {}, TC.el("span", { class: `pill ${w.status}` }, w.status)),
        cell(TC.num(w.nthreads), "num"), cell(TC.pct(m.cpu), "num"),
        TC.el("td", {}, TC.memoryCell(m.rss || 0, w.memory_limit)),
        cell(TC.bytes(w.nbytes), "num"), cell(TC.bytes(m.spilled_bytes), "num"),
        cell(TC.num(w.memory_keys), "num"), cell(TC.num(m.executing), "num"),
        cell(TC.num(m.ready), "num"), cell(TC.num(w.processing), "num"),
        cell(TC.seconds(w.occupancy), "num"),
        cell(`${TC.bytes(m.transfer_incoming_bytes)} / ${TC.bytes(m.transfer_outgoing_bytes)}`, "num"),
        cell(TC.num(w.comms), "num"), cell(TC.seconds(m.event_loop_delay), "num"),
        cell(w.last_seen ? TC.seconds(Math.max(now - w.last_seen, 0)) + " ago" : "–", "num"),
        TC.el("td", {}, link));
    }));
  }

  document.addEventListener("DOMContentLoaded", () => TC.stream("workers", render));
})();
