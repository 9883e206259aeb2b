// The status page: totals, task stream, per-prefix progress, tasks by state, workers.
"use strict";

(() => {
  const WINDOW = 10;            // seconds of task stream shown
  const ROW_H = 22;
  const LABEL_W = 150;
  const MAX_ROWS_KEPT = 50000;

  let clockOffset = 0;          // server clock minus ours, from each update's `now`
  let streamRows = [];          // {worker, prefix, start, stop, status}
  let streamHave = 0;           // index of the next task-stream row we do not have
  let workerOrder = [];         // addresses, in table order
  const workerNames = new Map();
  let rate = [];                // [time, task_stream_total] samples for throughput

  // -- task stream ---------------------------------------------------------------------------
  function addRows(first, rows) {
    for (let i = 0; i < rows.length; i++) {
      if (first + i < streamHave) continue;          // already loaded over HTTP
      streamRows.push(rows[i]);
    }
    streamHave = Math.max(streamHave, first + rows.length);
    if (streamRows.length > MAX_ROWS_KEPT) streamRows = streamRows.slice(-MAX_ROWS_KEPT);
  }

  function drawStream() {
    const canvas = document.getElementById("task-stream");
    const workers = workerOrder.length ? workerOrder : [...new Set(streamRows.map(r => r.worker))];
    const rows = Math.max(workers.length, 2);
    const { ctx, w, h } = TC.fitCanvas(canvas, rows * ROW_H + 26);
    const now = Date.now() / 1000 + clockOffset;
    const t0 = now - WINDOW;
    const plotW = w - LABEL_W - 8;
    const x = (t) => LABEL_W + ((t - t0) / WINDOW) * plotW;
    ctx.clearRect(0, 0, w, h);

    // row bands and labels
    ctx.font = "12px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    const index = new Map();
    workers.forEach((addr, i) => {
      index.set(addr, i);
      if (i % 2 === 0) {
        ctx.fillStyle = "#f7f9fb";
        ctx.fillRect(LABEL_W, i * ROW_H, plotW, ROW_H);
      }
      ctx.fillStyle = "#5b6678";
      const label = workerNames.get(addr) || addr;
      ctx.fillText(label.length > 20 ? label.slice(0, 19) + "…" : label, 4, i * ROW_H + ROW_H / 2);
    });

    // second grid and axis
    ctx.strokeStyle = "#e3e7ee";
    ctx.fillStyle = "#98a2b3";
    ctx.textAlign = "center";
    for (let s = Math.ceil(t0); s <= now; s++) {
      const gx = Math.round(x(s)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(gx, 0);
      ctx.lineTo(gx, rows * ROW_H);
      ctx.stroke();
      const ago = Math.round(now - s);
      if (ago % 2 === 0) ctx.fillText(ago === 0 ? "now" : `-${ago}s`, gx, rows * ROW_H + 13);
    }
    ctx.textAlign = "left";

    // tasks
    let kept = 0;
    for (const r of streamRows) {
      if (r.stop < t0 - 2) continue;
      streamRows[kept++] = r;
      const i = index.get(r.worker);
      if (i === undefined || r.stop < t0) continue;
      const x0 = x(Math.max(r.start, t0));
      const x1 = Math.max(x(r.stop), x0 + 1.5);
      ctx.fillStyle = r.status === "erred" ? TC.STATE_COLORS.erred : TC.prefixColor(r.prefix);
      ctx.fillRect(x0, i * ROW_H + 3, x1 - x0, ROW_H - 6);
    }
    streamRows.length = kept;
    if (!workers.length) {
      ctx.fillStyle = "#98a2b3";
      ctx.textAlign = "center";
      ctx.fillText("No workers connected", LABEL_W + plotW / 2, ROW_H);
      ctx.textAlign = "left";
    }
  }

  function drawLegend() {
    const legend = document.getElementById("stream-legend");
    const prefixes = [...new Set(streamRows.map(r => r.prefix))].sort();
    const key = prefixes.join("\u0000");
    if (legend.dataset.key === key) return;
    legend.dataset.key = key;
    legend.replaceChildren(...prefixes.slice(0, 30).map(p =>
      TC.el("span", {}, TC.el("i", { style: `background:${TC.prefixColor(p)}` }), p)));
  }

  function frame() {
    drawStream();
    drawLegend();
    setTimeout(() => requestAnimationFrame(frame), 50);     // ~20 frames a second is smooth enough
  }

  // -- totals ------------------------------------------------------------------------------------
  function totals(msg) {
    const info = msg.info, c = msg.counts.states;
    TC.setText("t-workers", TC.num(info.workers));
    TC.setText("t-threads", `${TC.num(info.nthreads)} threads`);
    TC.setText("t-memory", TC.bytes(info.memory_bytes));
    TC.setText("t-memory-limit", info.memory_limit ? `of ${TC.bytes(info.memory_limit)} limit` : "no limit");
    TC.setText("t-tasks", TC.num(msg.counts.total));
    TC.setText("t-clients", `${TC.num(info.clients)} client${info.clients === 1 ? "" : "s"}`);
    TC.setText("t-processing", TC.num(c.processing));
    TC.setText("t-queued", `${TC.num(c.queued + c.waiting)} waiting`);
    TC.setText("t-inmemory", TC.num(c.memory));
    TC.setText("t-erred", TC.num(c.erred));
    document.getElementById("c-erred").classList.toggle("bad", c.erred > 0);
    TC.setText("t-delay", TC.seconds(info.dashboard ? info.dashboard.event_loop_delay : null));
    const total = info.task_stream_total;
    if (total !== null && total !== undefined) {
      rate.push([msg.now, total]);
      while (rate.length > 2 && rate[0][0] < msg.now - 5) rate.shift();
      const [ta, na] = rate[0];
      const dt = msg.now - ta;
      TC.setText("t-rate", dt > 0.2 ? TC.num(Math.round((total - na) / dt)) : "0");
    }
  }

  // -- progress ------------------------------------------------------------------------------------
  function progress(prefixes) {
    const box = document.getElementById("progress");
    const rows = prefixes.prefixes.filter(p => p.live > 0);
    if (!rows.length) {
      if (!box.querySelector(".empty")) box.replaceChildren(TC.el("div", { class: "empty" }, "No tasks in flight"));
      return;
    }
    const existing = new Map([...box.querySelectorAll(".prow")].map(e => [e.dataset.prefix, e]));
    const wanted = [];
    for (const p of rows) {
      let row = existing.get(p.prefix);
      if (!row) {
        const color = TC.prefixColor(p.prefix);
        row = TC.el("div", { class: "prow", role: "progressbar", "aria-valuemin": "0", "data-prefix": p.prefix },
          TC.el("div", { class: "pname", title: p.prefix }, p.prefix),
          TC.el("div", { class: "pbar" },
            TC.el("span", { class: "seg done", style: `background:${color}` }),
            TC.el("span", { class: "seg processing", style: `background:${color};opacity:.45` }),
            TC.el("span", { class: "seg pending" }),
            TC.el("span", { class: "seg erred" })),
          TC.el("div", { class: "pcount" }));
      }
      const total = Math.max(p.total, 1);
      const segs = row.querySelectorAll(".seg");
      [p.finished, p.processing, p.pending, p.erred].forEach((v, i) => {
        segs[i].style.width = `${(100 * v / total).toFixed(2)}%`;
      });
      row.setAttribute("aria-valuenow", p.finished);
      row.setAttribute("aria-valuemax", p.total);
      row.dataset.done = p.finished;
      row.dataset.total = p.total;
      const count = row.querySelector(".pcount");
      const text = `${TC.num(p.finished)} / ${TC.num(p.total)}`;
      if (count.textContent !== text) {
        count.replaceChildren(TC.el("b", {}, TC.num(p.finished)), ` / ${TC.num(p.total)}`);
        count.title = p.erred ? `${p.erred} erred` : "";
      }
      wanted.push(row);
    }
    const same = wanted.length === box.children.length && wanted.every((r, i) => box.children[i] === r);
    if (!same) box.replaceChildren(...wanted);
  }

  // -- tasks by state ----------------------------------------------------------------------------
  function states(counts) {
    const box = document.getElementById("states");
    const max = Math.max(1, ...TC.STATES.map(s => counts.states[s] || 0));
    if (!box.children.length) {
      for (const s of TC.STATES) {
        box.append(TC.el("div", { class: "srow", "data-state": s },
          TC.el("div", { class: "sname" }, s),
          TC.el("div", { class: "sbar" }, TC.el("span", { style: `background:${TC.STATE_COLORS[s]};width:0` })),
          TC.el("div", { class: "snum" }, "0")));
      }
    }
    for (const row of box.children) {
      const n = counts.states[row.dataset.state] || 0;
      row.querySelector(".sbar span").style.width = `${(100 * n / max).toFixed(1)}%`;
      const t = TC.num(n);
      const num = row.querySelector(".snum");
      if (num.textContent !== t) num.textContent = t;
    }
  }

  // -- workers -------------------------------------------------------------------------------------
  function workers(data) {
    const list = [...data.workers].sort((a, b) => String(a.name).localeCompare(String(b.name), "en", { numeric: true }));
    workerOrder = list.map(w => w.address);
    workerNames.clear();
    for (const w of list) workerNames.set(w.address, w.name);
    TC.setText("workers-hint", data.total > data.workers.length
      ? `${data.workers.length} of ${data.total} shown; see the Workers page` : `${data.total} connected`);
    const body = document.querySelector("#workers-table tbody");
    if (!list.length) {
      body.replaceChildren(TC.el("tr", {}, TC.el("td", { colspan: "9", class: "empty" }, "No workers connected")));
      return;
    }
    const rows = list.map(w => {
      const m = w.metrics || {};
      return TC.el("tr", { "data-worker": w.address },
        TC.el("td", {}, w.name),
        TC.el("td", { class: "mono" }, w.address),
        TC.el("td", { class: "num" }, TC.num(w.nthreads)),
        TC.el("td", { class: "num" }, TC.pct(m.cpu)),
        TC.el("td", {}, TC.memoryCell(m.rss || 0, w.memory_limit)),
        TC.el("td", { class: "num" }, TC.seconds(w.occupancy)),
        TC.el("td", { class: "num" }, TC.num(w.processing)),
        TC.el("td", { class: "num" }, TC.bytes(w.nbytes)),
        TC.el("td", { class: "num" }, TC.num(w.memory_keys)));
    });
    const sum = (f) => list.reduce((a, w) => a + (f(w) || 0), 0);
    rows.push(TC.el("tr", { class: "totals" },
      TC.el("td", {}, "Total"), TC.el("td", {}, `${list.length} workers`),
      TC.el("td", { class: "num" }, TC.num(sum(w => w.nthreads))),
      TC.el("td", { class: "num" }, ""),
      TC.el("td", {}, TC.memoryCell(sum(w => (w.metrics || {}).rss), sum(w => w.memory_limit))),
      TC.el("td", { class: "num" }, TC.seconds(sum(w => w.occupancy))),
      TC.el("td", { class: "num" }, TC.num(sum(w => w.processing))),
      TC.el("td", { class: "num" }, TC.bytes(sum(w => w.nbytes))),
      TC.el("td", { class: "num" }, TC.num(sum(w => w.memory_keys)))));
    body.replaceChildren(...rows);
  }

  function update(msg) {
    if (typeof msg.now === "number") clockOffset = msg.now - Date.now() / 1000;
    totals(msg);
    progress(msg.prefixes);
    states(msg.counts);
    workers(msg.workers);
    addRows(msg.task_stream.first, msg.task_stream.rows);
  }

  async function init() {
    try {
      const hist = await TC.getJSON("api/v1/task-stream?limit=5000");
      addRows(hist.first, hist.rows);
    } catch (e) {
      console.warn("task stream history unavailable:", e.message);
    }
    TC.stream("status", update);
    requestAnimationFrame(frame);
  }
  document.addEventListener("DOMContentLoaded", init);
})();
