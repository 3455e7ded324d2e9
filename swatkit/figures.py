"""Pictures without a plotting library: SVG files written by hand, next to the JSON they show.

heatmap_svg   layers x modules, colour = a module's change (the paper's Figure 3); also the
              update magnitudes of a tuned model, with Mods_Rob's cells outlined (Figure 5)
curve_svg     the search's joint change against the set size
lines_svg     a few named lines over training steps (e.g. the probe's accuracy as a model tunes)
"""

import math
from xml.sax.saxutils import escape

from .files import write_output

CELL = 18  # pixels per heat-map cell
MARK = "<!-- written by swat-min -->"  # for a reader; the folder's manifest is what proves it
CHAR = 0.6  # a generous width of one sans-serif character, in units of the font size


def text_width(text, size):
    """The width a label takes, estimated (no font metrics without a renderer): size * CHAR per
    character."""
    return len(text) * size * CHAR


class Canvas:
    """An SVG picture under construction that knows where each label ends, so that its frame grows
    to hold every one (a long title or legend entry never runs off the edge)."""

    def __init__(self, width, height):
        self.width = width
        self.height = height
        self.parts = []
        self.low = 0.0  # the leftmost and rightmost extents of anything drawn
        self.high = float(width)

    def add(self, element):
        self.parts.append(element)

    def text(self, x, y, label, size=11, anchor="start"):
        width = text_width(label, size)
        left = x - {"start": 0, "middle": width / 2, "end": width}[anchor]
        self.low = min(self.low, left)
        self.high = max(self.high, left + width)
        self.parts.append(
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}">'
            f"{escape(label)}</text>"
        )

    def write(self, path):
        """The file: the frame widened to the extents, everything shifted right past x = 0."""
        shift = 4 - self.low if self.low < 4 else 0
        width = round(self.high + shift + 6)
        head = (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{self.height}" '
            f'viewBox="0 0 {width} {self.height}" font-family="sans-serif" font-size="11">'
        )
        body = [head, MARK, f'<g transform="translate({shift:.1f},0)">', *self.parts, "</g>"]
        write_output(path, "\n".join(body + ["</svg>"]) + "\n")


def ticks(low, high, count=5):
    """About `count` round values spanning [low, high] (1, 2 or 5 times a power of ten apart)."""
    if not high > low:
        return [low]
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def axes(canvas, left, right, top, bottom, x_range, y_range, x_label, y_label):
    """Two axes with ticks and their values, and the axis labels. -> (x_of, y_of): data to
    pixels."""
    x_low, x_high = x_range
    y_low, y_high = y_range
    x_span = (x_high - x_low) or 1.0
    y_span = (y_high - y_low) or 1.0

    def x_of(x):
        return left + (right - left) * (x - x_low) / x_span

    def y_of(y):
        return bottom - (bottom - top) * (y - y_low) / y_span

    canvas.add(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>')
    canvas.add(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="black"/>')
    for x in ticks(x_low, x_high):
        px = x_of(x)
        canvas.add(f'<line x1="{px:.1f}" y1="{bottom}" x2="{px:.1f}" y2="{bottom + 4}" '
                   'stroke="black"/>')  # fmt: skip
        canvas.text(px, bottom + 16, f"{x:g}", anchor="middle")
    for y in ticks(y_low, y_high):
        py = y_of(y)
        canvas.add(f'<line x1="{left - 4}" y1="{py:.1f}" x2="{left}" y2="{py:.1f}" '
                   'stroke="black"/>')  # fmt: skip
        canvas.text(left - 6, py + 4, f"{y:.3g}", anchor="end")
    canvas.text((left + right) / 2, bottom + 32, x_label, anchor="middle")
    canvas.text(left, top - 8, y_label)  # above the axis, where it needs no rotation
    return x_of, y_of


def colour(value, low, high):
    """White at low to dark red at high (a sequential scale)."""
    t = 0.0 if high <= low else min(1.0, max(0.0, (value - low) / (high - low)))
    red = 255 - round(105 * t)
    other = round(255 * (1 - t))
    return f"rgb({red},{other},{other})"


def heatmap_svg(path, table, title, unit, outlined=(), outlined_label="Mods_Rob"):
    """A heat map of {module: [value per layer]}: one cell per (layer, module), axis labels, and a
    colour scale. outlined: (layer, module) cells drawn with a black border (e.g. Mods_Rob), named
    in a legend by outlined_label."""
    modules = list(table)
    n_layers = len(table[modules[0]])
    values = [v for row in table.values() for v in row]
    low = min(values)
    high = max(values)
    left = 50
    top = 40
    height = top + len(modules) * CELL + 80
    canvas = Canvas(left + n_layers * CELL + 20, height)
    canvas.text(left, 20, title, size=13)
    for row, name in enumerate(modules):
        y = top + row * CELL
        canvas.text(left - 6, y + 13, name, anchor="end")
        for layer, value in enumerate(table[name]):
            x = left + layer * CELL
            border = ' stroke="black" stroke-width="2"' if (layer, name) in outlined else ""
            canvas.add(
                f'<rect class="cell" x="{x}" y="{y}" width="{CELL}" height="{CELL}" '
                f'fill="{colour(value, low, high)}"{border}>'
                f"<title>layer {layer} {escape(name)}: {value:.4g}</title></rect>"
            )
    axis = top + len(modules) * CELL
    for layer in range(0, n_layers, 5):  # layer labels every 5
        canvas.text(left + layer * CELL + CELL / 2, axis + 14, str(layer), anchor="middle")
    canvas.text(left, axis + 30, "layer")
    # the colour scale: ten steps from the lowest value to the highest
    for step in range(10):
        value = low + (high - low) * step / 9
        canvas.add(
            f'<rect x="{left + step * 20}" y="{axis + 42}" width="20" height="10" '
            f'fill="{colour(value, low, high)}"/>'
        )
    canvas.text(left, axis + 68, f"{low:.3g}")
    canvas.text(left + 200, axis + 68, f"{high:.3g}", anchor="end")
    canvas.text(left + 210, axis + 52, unit)
    if outlined:  # what a black box means
        x = left + 220 + text_width(unit, 11)
        canvas.add(f'<rect class="legend" x="{x:.1f}" y="{axis + 42}" width="12" height="12" '
                   'fill="white" stroke="black" stroke-width="2"/>')  # fmt: skip
        canvas.text(x + 18, axis + 52, outlined_label)
    canvas.write(path)


def curve_svg(path, curve, tolerance, title):
    """The search: each module tried (x: its place in the order) and the joint change with it
    (y); kept modules filled, rejected ones hollow (a legend says so); the tolerance dashed."""
    width = 600
    height = 290
    left = 60
    right = width - 150  # the legend sits on the right
    top = 50
    bottom = height - 60
    changes = [c["change"] for c in curve] + [tolerance, 0.0]
    canvas = Canvas(width, height)
    canvas.text(left, 18, title, size=13)
    x_label = "modules tried, most robust first"
    x_of, y_of = axes(canvas, left, right, top, bottom, (0, max(1, len(curve))),
                      (min(changes), max(changes)), x_label, "joint change")  # fmt: skip
    tol = y_of(tolerance)
    canvas.add(f'<line x1="{left}" y1="{tol:.1f}" x2="{right}" y2="{tol:.1f}" stroke="grey" '
               'stroke-dasharray="4 3"/>')  # fmt: skip
    canvas.text(right, tol - 4, "tolerance", anchor="end")
    for i, c in enumerate(curve):
        fill = "black" if c["kept"] else "white"
        canvas.add(
            f'<circle class="point" cx="{x_of(i + 1):.1f}" cy="{y_of(c["change"]):.1f}" r="3" '
            f'fill="{fill}" stroke="black"><title>{c["module"]}: {c["change"]:.4g}</title></circle>'
        )
    # the legend: what a filled and a hollow dot mean
    for i, (fill, meaning) in enumerate((("black", "kept in Mods_Rob"), ("white", "rejected"))):
        y = top + 16 * i
        canvas.add(f'<circle class="legend" cx="{right + 20}" cy="{y}" r="3" fill="{fill}" '
                   'stroke="black"/>')  # fmt: skip
        canvas.text(right + 30, y + 4, meaning)
    canvas.write(path)


COLOURS = ["black", "firebrick", "steelblue", "darkgoldenrod", "seagreen", "purple"]


def lines_svg(path, series, title, x_label, y_label):
    """{name: [(x, y), ...]} as one line each, with a legend on the right; ticks with their values
    on both axes."""
    width = 560
    height = 320
    left = 56
    top = 46
    bottom = height - 52
    right = width - 150  # the legend sits on the right
    xs = [x for points in series.values() for x, _ in points] or [0, 1]
    ys = [y for points in series.values() for _, y in points] or [0, 1]
    canvas = Canvas(width, height)
    canvas.text(left, 18, title, size=13)
    x_of, y_of = axes(canvas, left, right, top, bottom, (min(xs), max(xs)), (min(ys), max(ys)),
                      x_label, y_label)  # fmt: skip
    for i, (name, points) in enumerate(series.items()):
        colour_ = COLOURS[i % len(COLOURS)]
        line = " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in points)
        canvas.add(
            f'<polyline class="line" points="{line}" fill="none" stroke="{colour_}" '
            f'stroke-width="1.6"><title>{escape(name)}</title></polyline>'
        )
        y = top + 16 * i
        canvas.add(f'<line class="legend" x1="{right + 10}" y1="{y}" x2="{right + 30}" y2="{y}" '
                   f'stroke="{colour_}" stroke-width="2"/>')  # fmt: skip
        canvas.text(right + 34, y + 4, name)
    canvas.write(path)


def heatmap(scan_result, ranked):
    """The paper's figure in the terminal: modules as rows, layers as columns, darker = less robust
    (shades by rank in `ranked`, every (layer, module) most robust first)."""
    shades = " .:-=+*#%@"
    position = {lm: i for i, lm in enumerate(ranked)}
    modules = list(scan_result["later"])
    n_layers = len(scan_result["later"][modules[0]])
    lines = ["      " + "".join(f"{layer % 10}" for layer in range(n_layers))]
    for name in modules:
        ranks = [
            min(9, int(10 * position[(layer, name)] / len(ranked))) for layer in range(n_layers)
        ]
        lines.append(f"{name:>5} " + "".join(shades[r] for r in ranks))
    lines.append("      (layers mod 10; ' ' most robust ... '@' least robust, by rank)")
    return "\n".join(lines)
