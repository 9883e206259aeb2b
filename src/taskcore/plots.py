"""Inline SVG plots, drawn in Python: the task stream and the profile's flame graph.

Used by `performance_report`, and by `get_task_stream(plot=True)` and
`profile(plot=True)`. The output is plain SVG text, no script and no external URL, so
a report is one self-contained file. Hover titles (`<title>`) carry the details.

Bounded: at most `MAX_RECTS` rectangles per plot. The task stream first merges
neighbouring tasks of one prefix on a lane that touch at the plot's resolution; if
that is still too many, each lane is cut into columns and each column is drawn in the
colour of the prefix that used most of it. The flame graph skips frames narrower
than half a pixel.
"""
from __future__ import annotations

import html
import zlib

MAX_RECTS = 20_000
WIDTH = 1000             # plot area, px
LABEL_WIDTH = 190        # lane labels, px

# Category20-like palette: distinct for the first 20 prefixes.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
           "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"]
ERRED = "#000000"


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def hashed_color(name) -> str:
    return PALETTE[zlib.crc32(str(name).encode()) % len(PALETTE)]


def prefix_colors(prefixes_by_weight) -> dict:
    """Palette colours for prefixes, heaviest first (distinct for the first 20)."""
    out = {}
    for i, p in enumerate(prefixes_by_weight):
        out[p] = PALETTE[i] if i < len(PALETTE) else hashed_color(p)
    return out


def format_seconds(s) -> str:
    s = float(s)
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.0f} µs"
    return f"{s * 1e9:.0f} ns"


class Figure:
    """An SVG plot: `.svg` (the text), `_repr_html_` (Jupyter), `save(filename)` (a
    standalone HTML page)."""

    def __init__(self, svg: str, title: str):
        self.svg = svg
        self.title = title

    def _repr_html_(self):
        return self.svg

    def save(self, filename):
        with open(filename, "w", encoding="utf-8") as f:
            f.write("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
                    f"<title>{esc(self.title)}</title></head><body>"
                    f"<h1 style=\"font-family:sans-serif\">{esc(self.title)}</h1>"
                    f"{self.svg}</body></html>\n")
        return filename

    def __repr__(self):
        return f"<Figure {self.title!r}: {len(self.svg)} characters of SVG>"


# -- task stream ----------------------------------------------------------------------------------

def _ticks(span, n=8):
    """Round tick steps for an axis of `span` seconds."""
    if span <= 0:
        return 1.0
    raw = span / n
    mag = 10 ** int(f"{raw:e}".split("e")[1])
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _lanes(tasks):
    """{worker: [lane: [task, ...]]}: a worker's tasks packed onto as few lanes as
    overlap needs (about one per thread)."""
    by_worker: dict = {}
    for t in sorted(tasks, key=lambda t: (t["worker"], t["start"])):
        lanes = by_worker.setdefault(t["worker"], [])
        ends = [lane[-1]["stop"] for lane in lanes]
        for i, end in enumerate(ends):
            if end <= t["start"] + 1e-6:
                lanes[i].append(t)
                break
        else:
            lanes.append([t])
    return by_worker


def task_stream_svg(data: list, max_rects: int = MAX_RECTS) -> tuple:
    """(svg text, number of rectangles drawn) for task-stream records (the dicts of
    `get_task_stream`)."""
    tasks = []
    for d in data:
        ss = d["startstops"][0] if d.get("startstops") else None
        if ss is None:
            continue
        tasks.append({"key": d["key"], "worker": d["worker"], "prefix": d.get("prefix"),
                      "status": d.get("status"), "start": ss["start"], "stop": ss["stop"]})
    if not tasks:
        return ('<svg xmlns="http://www.w3.org/2000/svg" width="400" height="30">'
                '<text x="5" y="20" font-family="sans-serif" font-size="13">'
                'No tasks ran.</text></svg>', 0)
    t0 = min(t["start"] for t in tasks)
    t1 = max(t["stop"] for t in tasks)
    span = max(t1 - t0, 1e-6)
    scale = WIDTH / span
    weight: dict = {}
    for t in tasks:
        weight[t["prefix"]] = weight.get(t["prefix"], 0.0) + (t["stop"] - t["start"])
    colors = prefix_colors(sorted(weight, key=weight.get, reverse=True))
    by_worker = _lanes(tasks)
    lanes = [(w, i, lane) for w in sorted(by_worker) for i, lane in enumerate(by_worker[w])]
    lane_h = max(2, min(16, 900 // max(len(lanes), 1)))
    rects = _merge_rects(lanes, t0, scale)
    mode = "tasks"
    if len(rects) > max_rects:
        rects = _bucket_rects(lanes, t0, scale, max(1, max_rects // max(len(lanes), 1)))
        mode = "columns"
    legend_rows = (len(colors) + 5) // 6
    top = 10
    height = top + len(lanes) * lane_h + 40 + legend_rows * 18
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="task-stream" '
           f'width="{LABEL_WIDTH + WIDTH + 20}" height="{height}" font-family="sans-serif" '
           f'font-size="11">']
    # lane labels: the worker once, on its first lane
    prev = None
    for row, (w, i, _lane) in enumerate(lanes):
        y = top + row * lane_h
        if w != prev:
            out.append(f'<line x1="{LABEL_WIDTH}" x2="{LABEL_WIDTH + WIDTH}" y1="{y}" y2="{y}" '
                       f'stroke="#ddd"/>')
            if lane_h >= 8 or row % max(1, 8 // lane_h) == 0:
                out.append(f'<text x="{LABEL_WIDTH - 4}" y="{y + min(lane_h, 12)}" '
                           f'text-anchor="end">{esc(_short(w, 30))}</text>')
            prev = w
    for row, x, wpx, prefix, status, title in rects:
        y = top + row * lane_h
        fill = ERRED if status == "erred" else colors.get(prefix, hashed_color(prefix))
        out.append(f'<rect x="{LABEL_WIDTH + x:.2f}" y="{y + 0.5:.1f}" '
                   f'width="{max(wpx, 0.4):.2f}" height="{max(lane_h - 1, 1)}" fill="{fill}">'
                   f'<title>{esc(title)}</title></rect>')
    # time axis
    axis_y = top + len(lanes) * lane_h + 4
    out.append(f'<line x1="{LABEL_WIDTH}" x2="{LABEL_WIDTH + WIDTH}" y1="{axis_y}" '
               f'y2="{axis_y}" stroke="#333"/>')
    step = _ticks(span)
    k = 0
    while k * step <= span + 1e-12 and k < 100:
        x = LABEL_WIDTH + k * step * scale
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{axis_y}" y2="{axis_y + 4}" '
                   f'stroke="#333"/><text x="{x:.1f}" y="{axis_y + 15}" text-anchor="middle">'
                   f'{esc(format_seconds(k * step) if k else "0")}</text>')
        k += 1
    ly = axis_y + 34
    for j, (p, c) in enumerate(colors.items()):
        x = LABEL_WIDTH + (j % 6) * (WIDTH // 6)
        y = ly + (j // 6) * 18
        out.append(f'<rect x="{x}" y="{y - 10}" width="12" height="12" fill="{c}"/>'
                   f'<text x="{x + 16}" y="{y}">{esc(_short(p, 24))} '
                   f'({esc(format_seconds(weight[p]))})</text>')
    out.append(f'<desc>{len(tasks)} tasks drawn as {len(rects)} rectangles ({mode})</desc>')
    out.append("</svg>")
    return "".join(out), len(rects)


def _short(text, n):
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _merge_rects(lanes, t0, scale):
    """One rectangle per task, except that neighbours of one prefix and status on a lane
    that touch at this resolution (a gap under a pixel) become one."""
    rects = []
    for row, (w, _i, lane) in enumerate(lanes):
        cur = None
        for t in lane:
            x0 = (t["start"] - t0) * scale
            x1 = (t["stop"] - t0) * scale
            if (cur is not None and cur[3] == t["prefix"] and cur[4] == t["status"]
                    and x0 - cur[5] < 1.0):
                cur[5] = max(cur[5], x1)
                cur[6] += 1
                cur[7] += t["stop"] - t["start"]
                continue
            if cur is not None:
                rects.append(_finish(cur, w))
            cur = [row, x0, t["key"], t["prefix"], t["status"], x1, 1, t["stop"] - t["start"]]
        if cur is not None:
            rects.append(_finish(cur, w))
    return rects


def _finish(cur, worker):
    row, x0, key, prefix, status, x1, n, busy = cur
    if n == 1:
        title = f"{key}\n{prefix}: {format_seconds(busy)} on {worker}" + (
            " (erred)" if status == "erred" else "")
    else:
        title = (f"{n} tasks of {prefix}, {format_seconds(busy)} in all on {worker}"
                 + (" (erred)" if status == "erred" else ""))
    return (row, x0, x1 - x0, prefix, status, title)


def _bucket_rects(lanes, t0, scale, columns):
    """Per lane, `columns` columns, each in the colour of the prefix that used most of it."""
    width = WIDTH / columns
    rects = []
    for row, (w, _i, lane) in enumerate(lanes):
        cols: dict = {}
        for t in lane:
            x0 = (t["start"] - t0) * scale
            x1 = max((t["stop"] - t0) * scale, x0 + 1e-9)
            c0 = int(x0 // width)
            c1 = min(int(x1 // width), columns - 1)
            for c in range(c0, c1 + 1):
                lo = max(x0, c * width)
                hi = min(x1, (c + 1) * width)
                if hi <= lo and c0 != c1:
                    continue
                key = (t["prefix"], t["status"] == "erred")
                col = cols.setdefault(c, {})
                used = col.get(key)
                col[key] = (used[0] + max(hi - lo, 1e-9), used[1] + 1) if used else (
                    max(hi - lo, 1e-9), 1)
        for c, col in sorted(cols.items()):
            (prefix, erred), (_used, _n) = max(col.items(), key=lambda kv: kv[1][0])
            total = sum(v[1] for v in col.values())
            parts = ", ".join(f"{p}{' (erred)' if e else ''}: {n}"
                              for (p, e), (_u, n) in sorted(col.items(), key=lambda kv: -kv[1][0]))
            rects.append((row, c * width, width, prefix, "erred" if erred else "memory",
                          f"{total} tasks on {w}: {parts}"))
    return rects


# -- flame graph ----------------------------------------------------------------------------------

def flame_graph_svg(tree: dict, interval: float | None = None, max_rects: int = MAX_RECTS) -> str:
    """An icicle graph of a profile tree (root on top; width = share of samples)."""
    total = tree.get("count", 0)
    if not total:
        return ('<svg xmlns="http://www.w3.org/2000/svg" width="400" height="30">'
                '<text x="5" y="20" font-family="sans-serif" font-size="13">'
                'No samples.</text></svg>')
    row_h = 17
    rects = []
    level = [(tree, 0.0)]
    depth = 0
    while level and len(rects) < max_rects:
        nxt = []
        for node, x in level:
            w = node["count"] / total * WIDTH
            if w < 0.5:
                continue
            rects.append((depth, x, w, node))
            cx = x
            for child in sorted(node["children"].values(), key=lambda c: -c["count"]):
                nxt.append((child, cx))
                cx += child["count"] / total * WIDTH
            if len(rects) >= max_rects:
                break
        level = nxt
        depth += 1
    height = (max(r[0] for r in rects) + 1) * row_h + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="flame-graph" width="{WIDTH + 10}" '
           f'height="{height}" font-family="monospace" font-size="11">']
    for d, x, w, node in rects:
        desc = node.get("description") or {}
        name = desc.get("name") or ("all" if node["identifier"] == "root" else node["identifier"])
        y = 5 + d * row_h
        share = node["count"] / total
        title = f"{name} ({desc.get('filename', '')}:{desc.get('line_number', '')})"
        if desc.get("line"):
            title += f"\n{desc['line']}"
        title += f"\n{node['count']} samples, {share:.1%}"
        if interval:
            title += f", ~{format_seconds(node['count'] * interval)}"
        fill = "#bbb" if node["identifier"] == "root" else hashed_color(desc.get("filename", ""))
        out.append(f'<g><title>{esc(title)}</title><rect x="{x + 5:.2f}" y="{y}" '
                   f'width="{w:.2f}" height="{row_h - 1}" fill="{fill}" stroke="#fff" '
                   f'stroke-width="0.5"/>')
        chars = int((w - 4) // 7)
        if chars >= 3:
            out.append(f'<text x="{x + 7:.2f}" y="{y + 12}">{esc(_short(name, chars))}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)
