// The graph page: the task graph (nodes coloured by state, edges = dependencies), laid out
// by the server in layers; above the size limit, the graph of task prefixes.
"use strict";

(() => {
  let graph = null;
  let placed = [];              // [{x, y, r, node}] in CSS pixels, for the tooltip
  let lastKey = null;

  function legend(kind) {
    const box = document.getElementById("graph-legend");
    if (box.dataset.kind === kind) return;
    box.dataset.kind = kind;
    box.replaceChildren(...TC.STATES.map(s =>
      TC.el("span", {}, TC.el("i", { style: `background:${TC.STATE_COLORS[s]}` }), s)));
  }

  function draw() {
    const canvas = document.getElementById("graph");
    const banner = document.getElementById("graph-banner");
    if (!graph) return;
    const g = graph;
    const prefixes = g.kind === "prefixes";
    banner.hidden = !g.too_large;
    if (g.too_large) {
      banner.textContent = `The scheduler holds ${TC.num(g.n_tasks)} tasks, more than the ` +
        `${TC.num(g.limit)} drawn one by one: showing the graph of task prefixes instead ` +
        `(one node per prefix, coloured by its most common state).`;
    }
    TC.setText("graph-hint", prefixes
      ? `${TC.num(g.nodes.length)} prefixes, ${TC.num(g.n_tasks)} tasks`
      : `${TC.num(g.nodes.length)} tasks, ${TC.num(g.edges.length)} dependencies`);
    legend(g.kind);
    placed = [];
    if (!g.nodes.length) {
      const { ctx, w } = TC.fitCanvas(canvas, 120);
      ctx.clearRect(0, 0, w, 120);
      ctx.fillStyle = "#98a2b3";
      ctx.font = "14px system-ui, sans-serif";
      ctx.textAlign = "center";
      ctx.fillText("No tasks", w / 2, 60);
      return;
    }
    const maxX = Math.max(...g.nodes.map(n => n.x));
    const minY = Math.min(...g.nodes.map(n => n.y));     // the layout centres columns
    const maxY = Math.max(...g.nodes.map(n => n.y)) - minY;
    const width = canvas.clientWidth;
    const pad = prefixes ? 80 : 24;
    const dx = maxX > 0 ? Math.min((width - 2 * pad) / maxX, prefixes ? 220 : 120) : 0;
    const dy = prefixes ? 64 : Math.max(Math.min(600 / Math.max(maxY, 1), 34), 9);
    const height = Math.max(maxY * dy + 2 * pad, 160);
    const { ctx, w, h } = TC.fitCanvas(canvas, height);
    ctx.clearRect(0, 0, w, h);
    const ox = (width - maxX * dx) / 2;        // centred; a wide graph fills the width
    const px = (n) => ox + n.x * dx;
    const py = (n) => pad + (n.y - minY) * dy;
    const r = prefixes ? 0 : Math.max(Math.min(dy / 3, dx / 4 || 8, 8), 2.5);

    // edges first, as light curves from dependency to dependent
    ctx.strokeStyle = "rgba(120, 132, 150, 0.45)";
    ctx.lineWidth = prefixes ? 1.5 : 1;
    ctx.beginPath();
    for (const [a, b] of g.edges) {
      const na = g.nodes[a], nb = g.nodes[b];
      const x0 = px(na), y0 = py(na), x1 = px(nb), y1 = py(nb);
      const mid = (x0 + x1) / 2;
      ctx.moveTo(x0, y0);
      ctx.bezierCurveTo(mid, y0, mid, y1, x1, y1);
    }
    ctx.stroke();

    if (prefixes) {
      ctx.font = "12px system-ui, sans-serif";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      for (const n of g.nodes) {
        const label = `${n.prefix}  ${TC.num(n.count)}`;
        const bw = Math.max(ctx.measureText(label).width + 20, 60), bh = 26;
        const x = px(n), y = py(n);
        ctx.fillStyle = TC.STATE_COLORS[n.state] || "#ccc";
        roundRect(ctx, x - bw / 2, y - bh / 2, bw, bh, 6);
        ctx.fill();
        ctx.fillStyle = ["processing", "memory", "erred", "queued"].includes(n.state) ? "#fff" : "#1d2430";
        ctx.fillText(label, x, y);
        placed.push({ x, y, r: bw / 2, node: n });
      }
      ctx.textAlign = "left";
      return;
    }
    for (const n of g.nodes) {
      const x = px(n), y = py(n);
      ctx.beginPath();
      ctx.arc(x, y, r, 0, 2 * Math.PI);
      ctx.fillStyle = TC.STATE_COLORS[n.state] || "#ccc";
      ctx.fill();
      if (r >= 4) {
        ctx.lineWidth = 1.5;
        ctx.strokeStyle = "#fff";
        ctx.stroke();
      }
      placed.push({ x, y, r, node: n });
    }
  }

  function roundRect(ctx, x, y, w, h, rad) {
    ctx.beginPath();
    ctx.moveTo(x + rad, y);
    ctx.arcTo(x + w, y, x + w, y + h, rad);
    ctx.arcTo(x + w, y + h, x, y + h, rad);
    ctx.arcTo(x, y + h, x, y, rad);
    ctx.arcTo(x, y, x + w, y, rad);
    ctx.closePath();
  }

  function tooltip(ev) {
    const tip = document.getElementById("graph-tip");
    const rect = ev.currentTarget.getBoundingClientRect();
    const mx = ev.clientX - rect.left, my = ev.clientY - rect.top;
    let best = null, bestD = Infinity;
    for (const p of placed) {
      const d = Math.hypot(p.x - mx, p.y - my);
      if (d < Math.max(p.r + 4, 8) && d < bestD) { best = p; bestD = d; }
    }
    if (!best) { tip.style.display = "none"; return; }
    const n = best.node;
    const extra = n.states
      ? Object.entries(n.states).filter(([, v]) => v).map(([s, v]) => `${s} ${TC.num(v)}`).join(", ")
      : (n.worker ? `on ${n.worker}` : "");
    tip.replaceChildren(TC.el("div", { class: "k" }, n.key), TC.el("div", {}, `${n.state}${extra ? " · " + extra : ""}`));
    tip.style.display = "block";
    tip.style.left = `${Math.min(mx + 14, rect.width - tip.offsetWidth - 4)}px`;
    tip.style.top = `${my + 14}px`;
  }

  document.addEventListener("DOMContentLoaded", () => {
    const canvas = document.getElementById("graph");
    canvas.addEventListener("mousemove", tooltip);
    canvas.addEventListener("mouseleave", () => { document.getElementById("graph-tip").style.display = "none"; });
    window.addEventListener("resize", draw);
    TC.stream("graph", (msg) => {
      const key = JSON.stringify(msg.graph);
      if (key === lastKey) return;
      lastKey = key;
      graph = msg.graph;
      draw();
    });
  });
})();
