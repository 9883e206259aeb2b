"""taskcore.plots: the inline SVG task stream and flame graph, and their bounds."""
import random
import re
import xml.etree.ElementTree as ET

from taskcore import profile
from taskcore.plots import MAX_RECTS, Figure, flame_graph_svg, task_stream_svg

SVG = "{http://www.w3.org/2000/svg}"


def record(key, worker, start, stop, status="memory"):
    return {"key": key, "worker": worker, "status": status, "prefix": key.split("-")[0],
            "startstops": [{"action": "compute", "start": start, "stop": stop}]}


def parse(svg):
    return ET.fromstring(svg)            # well-formed XML, or this raises


def test_one_rect_per_task_with_titles_lanes_and_colours():
    data = [record("inc-1", "tcp://a:1", 0.0, 1.0), record("dec-2", "tcp://a:1", 0.5, 1.5),
            record("inc-3", "tcp://b:1", 0.0, 0.4), record("bad-4", "tcp://b:1", 2.0, 3.0,
                                                           "erred")]
    svg, n = task_stream_svg(data)
    root = parse(svg)
    rects = [r for r in root.iter(SVG + "rect") if r.find(SVG + "title") is not None]
    assert n == len(rects) == 4
    titles = [r.find(SVG + "title").text for r in rects]
    assert any(t.startswith("inc-1\n") for t in titles)
    ys = {r.find(SVG + "title").text.split("\n")[0]: float(r.get("y")) for r in rects}
    assert ys["inc-1"] != ys["dec-2"]             # overlapping on one worker: two lanes
    fills = {r.find(SVG + "title").text.split("\n")[0]: r.get("fill") for r in rects}
    assert fills["inc-1"] == fills["inc-3"] != fills["dec-2"]
    assert fills["bad-4"] == "#000000"
    texts = [t.text for t in root.iter(SVG + "text")]
    assert "tcp://a:1" in texts and "tcp://b:1" in texts


def test_touching_tasks_of_a_prefix_merge_and_huge_streams_are_bounded():
    # 1,000 back-to-back tasks on one lane: one rectangle
    data = [record(f"inc-{i}", "tcp://a:1", i * 0.001, (i + 1) * 0.001) for i in range(1000)]
    svg, n = task_stream_svg(data)
    assert n == 1
    assert "1000 tasks of inc" in svg
    # 60,000 tasks of 7 prefixes interleaved on 4 workers x 2 threads, with gaps: capped
    rnd = random.Random(1)
    data = []
    for w in range(4):
        for lane in range(2):
            t = 0.0
            for i in range(7500):
                d = rnd.uniform(0.001, 0.01)
                data.append(record(f"p{rnd.randrange(7)}-{w}-{lane}-{i}", f"tcp://w{w}:1",
                                   t, t + d))
                t += d + 0.002
    svg, n = task_stream_svg(data)
    assert 0 < n <= MAX_RECTS
    assert len(re.findall("<rect", svg)) <= MAX_RECTS + 100       # plus the legend
    assert len(svg) < 8_000_000
    root = parse(svg)
    assert "columns" in root.find(SVG + "desc").text


def test_empty_inputs():
    svg, n = task_stream_svg([])
    assert n == 0 and "No tasks" in svg
    parse(svg)
    assert "No samples" in flame_graph_svg(profile.create())


def test_flame_graph_widths_follow_counts_and_skip_slivers():
    def node(name, count, children=()):
        return {"identifier": f"{name};f.py;1", "count": count,
                "description": {"filename": "f.py", "name": name, "line_number": 1,
                                "line": f"{name}()"},
                "children": {c["identifier"]: c for c in children}}

    tiny = node("tiny", 1)
    tree = node("root", 10_000, [node("a", 7_500, [node("aa", 7_000)]),
                                 node("b", 2_499), tiny])
    tree["identifier"] = "root"
    svg = flame_graph_svg(tree, interval=0.01)
    root = parse(svg)
    rects = {g.find(SVG + "title").text.split(" ")[0]: float(g.find(SVG + "rect").get("width"))
             for g in root.iter(SVG + "g")}
    assert abs(rects["a"] / rects["root"] - 0.75) < 0.01
    assert abs(rects["aa"] / rects["root"] - 0.70) < 0.01
    assert "tiny" not in rects                  # 0.1 px wide: skipped
    assert "75.0%" in svg and "~75.00 s" in svg


def test_figure_save(tmp_path):
    fig = Figure("<svg xmlns=\"http://www.w3.org/2000/svg\"></svg>", "T <1>")
    path = fig.save(str(tmp_path / "f.html"))
    text = open(path).read()
    assert "<title>T &lt;1&gt;</title>" in text and fig._repr_html_() in text
