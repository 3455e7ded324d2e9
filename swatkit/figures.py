"""Pictures without a plotting library: SVG files written by hand, next to the JSON they show.

heatmap_svg   layers x modules, colour = a module's change (the paper's Figure 3); also the
              update magnitudes of a tuned model, with Mods_Rob's cells outlined (Figure 5)
curve_svg     the search's joint change against the set size
lines_svg     a few named lines over training steps (e.g. the probe's accuracy as a model tunes)
"""

from xml.sax.saxutils import escape

from .files import write_text

CELL = 18  # pixels per heat-map cell
MARK = "<!-- written by swat-min -->"  # lets a later run replace the picture (files.marked_as_ours)


def colour(value, low, high):
    """White at low to dark red at high (a sequential scale)."""
    t = 0.0 if high <= low else min(1.0, max(0.0, (value - low) / (high - low)))
    red = 255 - round(105 * t)
    other = round(255 * (1 - t))
    return f"rgb({red},{other},{other})"


def heatmap_svg(path, table, title, unit, outlined=()):
    """A heat map of {module: [value per layer]}: one cell per (layer, module), axis labels, and a
    colour scale. outlined: (layer, module) cells drawn with a black border (e.g. Mods_Rob)."""
    modules = list(table)
    n_layers = len(table[modules[0]])
    values = [v for row in table.values() for v in row]
    low = min(values)
    high = max(values)
    left = 50
    top = 40
    width = left + n_layers * CELL + 20
    height = top + len(modules) * CELL + 80
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        MARK,
        f'<text x="{left}" y="20" font-size="13">{escape(title)}</text>',
    ]
    for row, name in enumerate(modules):
        y = top + row * CELL
        parts.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{escape(name)}</text>')
        for layer, value in enumerate(table[name]):
            x = left + layer * CELL
            border = ' stroke="black" stroke-width="2"' if (layer, name) in outlined else ""
            parts.append(
                f'<rect class="cell" x="{x}" y="{y}" width="{CELL}" height="{CELL}" '
                f'fill="{colour(value, low, high)}"{border}>'
                f"<title>layer {layer} {escape(name)}: {value:.4g}</title></rect>"
            )
    axis = top + len(modules) * CELL
    for layer in range(0, n_layers, 5):  # layer labels every 5
        x = left + layer * CELL + CELL / 2
        parts.append(f'<text x="{x}" y="{axis + 14}" text-anchor="middle">{layer}</text>')
    parts.append(f'<text x="{left}" y="{axis + 30}">layer</text>')
    # the colour scale: ten steps from the lowest value to the highest
    for step in range(10):
        value = low + (high - low) * step / 9
        x = left + step * 20
        parts.append(
            f'<rect x="{x}" y="{axis + 42}" width="20" height="10" '
            f'fill="{colour(value, low, high)}"/>'
        )
    parts.append(f'<text x="{left}" y="{axis + 68}">{low:.3g}</text>')
    parts.append(f'<text x="{left + 200}" y="{axis + 68}" text-anchor="end">{high:.3g}</text>')
    parts.append(f'<text x="{left + 210}" y="{axis + 52}">{escape(unit)}</text>')
    parts.append("</svg>")
    write_text(path, "\n".join(parts) + "\n")


def curve_svg(path, curve, tolerance, title):
    """The search: each module tried (x: its place in the order) and the joint change with it
    (y); kept modules filled, rejected ones hollow; the tolerance as a dashed line."""
    width = 520
    height = 260
    left = 50
    bottom = height - 40
    changes = [c["change"] for c in curve] + [tolerance, 0.0]
    high = max(changes)
    low = min(changes)
    span = (high - low) or 1.0
    n = max(1, len(curve))

    def x_of(i):
        return left + (width - left - 20) * i / n

    def y_of(value):
        return bottom - (bottom - 30) * (value - low) / span

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        MARK,
        f'<text x="{left}" y="18" font-size="13">{escape(title)}</text>',
        f'<line x1="{left}" y1="{bottom}" x2="{width - 10}" y2="{bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="30" x2="{left}" y2="{bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="{y_of(tolerance):.1f}" x2="{width - 10}" '
        f'y2="{y_of(tolerance):.1f}" stroke="grey" stroke-dasharray="4 3"/>',
        f'<text x="{width - 10}" y="{y_of(tolerance) - 4:.1f}" text-anchor="end">tolerance</text>',
    ]
    for i, c in enumerate(curve):
        fill = "black" if c["kept"] else "white"
        parts.append(
            f'<circle class="point" cx="{x_of(i + 1):.1f}" cy="{y_of(c["change"]):.1f}" r="3" '
            f'fill="{fill}" stroke="black"><title>{c["module"]}: {c["change"]:.4g}</title></circle>'
        )
    parts.append(f'<text x="{left}" y="{height - 12}">modules tried, most robust first</text>')
    parts.append(
        f'<text x="{left - 6}" y="{y_of(high) + 4:.1f}" text-anchor="end">{high:.2g}</text>'
    )
    parts.append(f'<text x="{left - 6}" y="{y_of(low) + 4:.1f}" text-anchor="end">{low:.2g}</text>')
    parts.append("</svg>")
    write_text(path, "\n".join(parts) + "\n")


COLOURS = ["black", "firebrick", "steelblue", "darkgoldenrod", "seagreen", "purple"]


def lines_svg(path, series, title, x_label, y_label):
    """{name: [(x, y), ...]} as one line each, with a legend; the y axis spans the values."""
    width = 560
    height = 300
    left = 56
    bottom = height - 44
    right = width - 130  # the legend sits on the right
    xs = [x for points in series.values() for x, _ in points] or [0, 1]
    ys = [y for points in series.values() for _, y in points] or [0, 1]
    x_span = (max(xs) - min(xs)) or 1
    y_span = (max(ys) - min(ys)) or 1

    def at(x, y):
        px = left + (right - left) * (x - min(xs)) / x_span
        py = bottom - (bottom - 30) * (y - min(ys)) / y_span
        return f"{px:.1f},{py:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        MARK,
        f'<text x="{left}" y="18" font-size="13">{escape(title)}</text>',
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="30" x2="{left}" y2="{bottom}" stroke="black"/>',
        f'<text x="{left}" y="{height - 14}">{escape(x_label)}: {min(xs):g} to {max(xs):g}</text>',
        f'<text x="{left - 6}" y="34" text-anchor="end">{max(ys):.3g}</text>',
        f'<text x="{left - 6}" y="{bottom}" text-anchor="end">{min(ys):.3g}</text>',
        f'<text x="{left - 44}" y="{(bottom + 30) / 2:.0f}">{escape(y_label)}</text>',
    ]
    for i, (name, points) in enumerate(series.items()):
        colour_ = COLOURS[i % len(COLOURS)]
        line = " ".join(at(x, y) for x, y in points)
        parts.append(
            f'<polyline class="line" points="{line}" fill="none" stroke="{colour_}" '
            f'stroke-width="1.6"><title>{escape(name)}</title></polyline>'
        )
        y = 40 + 16 * i
        parts.append(
            f'<line x1="{right + 10}" y1="{y}" x2="{right + 30}" y2="{y}" stroke="{colour_}" '
            'stroke-width="2"/>'
        )
        parts.append(f'<text x="{right + 34}" y="{y + 4}">{escape(name)}</text>')
    parts.append("</svg>")
    write_text(path, "\n".join(parts) + "\n")


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
