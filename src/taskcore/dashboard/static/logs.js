// The logs page: the scheduler's recent log records, newest last.
"use strict";

(() => {
  const LEVELS = { DEBUG: 10, INFO: 20, WARNING: 30, ERROR: 40, CRITICAL: 50 };
  let last = null;

  function time(t) {
    const d = new Date(t * 1000);
    const pad = (n, w = 2) => String(n).padStart(w, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
           `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  }

  function render() {
    if (!last) return;
    const min = Number(document.getElementById("level").value);
    const box = document.getElementById("logbox");
    const records = last.logs.filter(r => (LEVELS[r.level] || 0) >= min);
    TC.setText("logs-hint", `${records.length} of the last ${last.logs.length} records`);
    const body = document.querySelector("#logs-table tbody");
    if (!records.length) {
      body.replaceChildren(TC.el("tr", {}, TC.el("td", { colspan: "4", class: "empty" }, "No log records")));
      return;
    }
    body.replaceChildren(...records.map(r => TC.el("tr", { class: r.level },
      TC.el("td", { class: "mono time" }, time(r.time)),
      TC.el("td", {}, TC.el("span", { class: `lvl ${r.level}` }, r.level)),
      TC.el("td", { class: "mono" }, r.logger),
      TC.el("td", { class: "msg" }, r.text))));
    if (document.getElementById("follow").checked) box.scrollTop = box.scrollHeight;
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("level").addEventListener("change", render);
    TC.stream("logs", (msg) => { last = msg.logs; render(); });
  });
})();
