"""Redraw pictures that an earlier swat-min wrote, in swatkit.figures' current style, from the
values the pictures themselves hold (their run folders are not kept): a heat map's cells carry
their values (4 significant digits) and outlines; a search curve's dots carry their changes and
kept/rejected fill; a line chart's points are read back from pixels through its axis range (to
about 0.5 % of the range). Each picture is rewritten in place.

  python experiments/redraw.py results/*.svg
"""

import os
import re
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from swatkit import figures

NS = "{http://www.w3.org/2000/svg}"


def texts(root):
    """[(x, y, text)] of every label."""
    return [(float(t.get("x")), float(t.get("y")), t.text or "") for t in root.iter(NS + "text")]


def heatmap(root, path):
    """Cells 'layer L m: v' -> the table, the outlined cells, the title and the unit."""
    table = {}
    outlined = set()
    for cell in root.iter(NS + "rect"):
        if cell.get("class") != "cell":
            continue
        layer, kind, value = re.match(
            r"layer (\d+) (\S+): (.*)", cell.find(NS + "title").text
        ).groups()
        table.setdefault(kind, {})[int(layer)] = float(value)
        if cell.get("stroke") == "black":
            outlined.add((int(layer), kind))
    labels = texts(root)
    title = labels[0][2]
    unit = [t for x, y, t in labels if t and not re.fullmatch(r"[-\d.e+]+|layer|\S", t)][-1]
    rows = {kind: [cells[layer] for layer in sorted(cells)] for kind, cells in table.items()}
    figures.heatmap_svg(path, rows, title, unit, outlined)


def curve(root, path):
    """Dots '[layer, m]: change' in search order; the tolerance from the dashed line's pixel."""
    points = []
    for dot in root.iter(NS + "circle"):
        if dot.get("class") != "point":
            continue
        module, change = dot.find(NS + "title").text.rsplit(": ", 1)
        points.append((float(dot.get("cy")), float(change), dot.get("fill") == "black", module))
    # two dots of different values give the pixel scale (y = a + b * change)
    y1, c1 = min((p[:2] for p in points), key=lambda p: p[1])
    y2, c2 = max((p[:2] for p in points), key=lambda p: p[1])
    dashed = [e for e in root.iter(NS + "line") if e.get("stroke-dasharray")][0]
    tolerance = c1 + (float(dashed.get("y1")) - y1) * (c2 - c1) / (y2 - y1)
    found = [{"module": m, "change": c, "kept": k} for _, c, k, m in points]
    figures.curve_svg(path, found, round(tolerance, 4), texts(root)[0][2])


def lines(root, path):
    """Polylines in pixels -> data, through the old layout (x: 56..430 over the range in the x
    label's words; y: 256..30 over the two y labels)."""
    labels = texts(root)
    title = labels[0][2]
    x_words = [t for _, _, t in labels if " to " in t][0]
    x_label, span = x_words.rsplit(": ", 1)
    x_low, x_high = (float(v) for v in span.split(" to "))
    y_values = sorted(float(t) for x, _, t in labels if re.fullmatch(r"-?[\d.]+", t))
    y_low = y_values[0]
    y_high = y_values[-1]
    y_label = [t for x, _, t in labels if x < 40][0]
    series = {}
    for line in root.iter(NS + "polyline"):
        points = []
        for pair in line.get("points").split():
            px, py = (float(v) for v in pair.split(","))
            x = x_low + (px - 56) / (430 - 56) * (x_high - x_low)
            y = y_low + (256 - py) / (256 - 30) * (y_high - y_low)
            points.append((round(x), round(y, 4)))
        series[line.find(NS + "title").text] = points
    figures.lines_svg(path, series, title, x_label, y_label)


def main(paths):
    for path in paths:
        root = ET.parse(path).getroot()
        if root.get("viewBox"):
            print(f"{path}: already in the current style")
            continue
        kinds = {e.get("class") for e in root.iter()}
        if "cell" in kinds:
            heatmap(root, path)
        elif "point" in kinds:
            curve(root, path)
        else:
            lines(root, path)
        print(f"{path}: redrawn")


if __name__ == "__main__":
    main(sys.argv[1:])
