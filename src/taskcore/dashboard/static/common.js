// Shared by every page: relative URLs, the live-update socket, formatting, colours.
// Every URL is relative to the page, so the dashboard works under any prefix and proxy.
"use strict";

const TC = (() => {
  const STATE_COLORS = {
    released: "#c9ced6", waiting: "#a3acb9", queued: "#8f9bb3", "no-worker": "#e8a33d",
    processing: "#4e79a7", memory: "#59a14f", erred: "#e15759", forgotten: "#eceff3",
  };
  const STATES = ["released", "waiting", "queued", "no-worker", "processing", "memory", "erred"];
  // prefix colours: a calm categorical palette without the red that means "erred"
  const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948",
                   "#ff9da7", "#9c755f", "#8cd17d", "#a0cbe8", "#d4a6c8", "#86bcb6"];
  const colorCache = new Map();

  function prefixColor(name) {
    let c = colorCache.get(name);
    if (c === undefined) {
      let h = 2166136261;                       // FNV-1a: stable across page loads
      for (let i = 0; i < name.length; i++) {
        h ^= name.charCodeAt(i);
        h = Math.imul(h, 16777619);
      }
      c = PALETTE[(h >>> 0) % PALETTE.length];
      colorCache.set(name, c);
    }
    return c;
  }

  async function getJSON(path) {
    const r = await fetch(path, { cache: "no-store" });
    if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
    return r.json();
  }

  // One WebSocket per page, reconnecting with backoff; `onMessage` gets each snapshot.
  function stream(page, onMessage) {
    const url = new URL("api/v1/stream?page=" + encodeURIComponent(page), location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const badge = document.getElementById("live");
    let delay = 500;
    function setLive(on) {
      if (!badge) return;
      badge.className = "live " + (on ? "on" : "off");
      badge.textContent = on ? "live" : "reconnecting";
    }
    function connect() {
      const ws = new WebSocket(url.href);
      ws.onopen = () => { delay = 500; setLive(true); };
      ws.onmessage = (e) => {
        const msg = JSON.parse(e.data);
        if (msg.info) header(msg.info);
        onMessage(msg);
      };
      ws.onclose = () => {
        setLive(false);
        setTimeout(connect, delay);
        delay = Math.min(delay * 2, 5000);
      };
    }
    connect();
  }

  function header(info) {
    const a = document.getElementById("sched-address");
    if (a && info.address && a.textContent !== info.address) a.textContent = info.address;
  }

  function markNav() {
    const page = document.body.dataset.page;
    for (const a of document.querySelectorAll("nav a")) {
      if (a.getAttribute("href") === page) a.classList.add("active");
    }
  }

  // -- formatting --------------------------------------------------------------------------
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0;
    let v = Number(n);
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? v.toFixed(0) : v.toFixed(v >= 100 ? 0 : 1)) + " " + units[i];
  }
  function num(n) {
    if (n === null || n === undefined) return "–";
    return Number(n).toLocaleString("en-US");
  }
  function pct(n) {
    if (n === null || n === undefined) return "–";
    return Number(n).toFixed(0) + " %";
  }
  function seconds(s) {
    if (s === null || s === undefined) return "–";
    if (s === 0) return "0 s";
    if (s < 1e-3) return (s * 1e6).toFixed(0) + " µs";
    if (s < 1) return (s * 1e3).toFixed(s < 0.01 ? 1 : 0) + " ms";
    if (s < 120) return s.toFixed(1) + " s";
    if (s < 7200) return (s / 60).toFixed(1) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  // -- DOM -----------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "style") e.style.cssText = v;
      else if (v !== null && v !== undefined) e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  function setText(id, text) {
    const e = document.getElementById(id);
    if (e && e.textContent !== String(text)) e.textContent = text;
  }

  // A memory cell: RSS against the worker's limit, as a bar and as text.
  function memoryCell(used, limit) {
    const frac = limit ? Math.min(used / limit, 1) : 0;
    const span = el("span", { style: `width:${(frac * 100).toFixed(1)}%` });
    if (frac > 0.95) span.className = "full";
    else if (frac > 0.75) span.className = "high";
    return el("div", { class: "mem" }, el("div", { class: "bar" }, span),
              el("div", { class: "txt" }, bytes(used) + (limit ? " / " + bytes(limit) : "")));
  }

  // A canvas sized to its CSS box at the screen's pixel density.
  function fitCanvas(canvas, cssHeight) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    canvas.style.height = cssHeight + "px";
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(cssHeight * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(cssHeight * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    return { ctx, w, h: cssHeight };
  }

  document.addEventListener("DOMContentLoaded", markNav);

  return { STATE_COLORS, STATES, prefixColor, getJSON, stream, bytes, num, pct, seconds,
           el, setText, memoryCell, fitCanvas };
})();
