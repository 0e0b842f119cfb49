#!/usr/bin/env python3
"""Grouped bar chart (SVG) of a benchmark CSV: one group per test (row), one bar per
system (column), values labelled, so ftss and its peers read side by side.

    ci/chart.py ci/out/bench-lun.csv docs/bench/bench-lun.svg "LUN IOPS, 4 KiB, depth 32"

The CSV's first column names the test, the others are systems; a header row names them.
Only the standard library: the chart is plain SVG text, reviewable in a diff.
"""
import csv
import html
import sys

PALETTE = ["#1f77b4", "#4c9be0", "#8fc1ee", "#2ca02c", "#98df8a", "#d62728", "#ff9896",
           "#9467bd", "#8c564b"]


def read(path):
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    if len(rows) < 2:
        raise SystemExit(f"{path}: want a header row and at least one data row")
    header, data = rows[0], rows[1:]
    systems = header[1:]
    tests = []
    for r in data:
        if len(r) != len(header):
            raise SystemExit(f"{path}: row {r[0]!r} has {len(r)} fields, header {len(header)}")
        tests.append((r[0], [float(x) if x else 0.0 for x in r[1:]]))
    return systems, tests


def nice_max(v):
    if v <= 0:
        return 1.0
    step = 10 ** (len(str(int(v))) - 1)
    return (int(v / step) + 1) * step


def svg(systems, tests, title):
    bar_w, gap, group_gap = 22, 3, 36
    left, top, bottom, right = 70, 50, 120, 20
    plot_h = 320
    group_w = len(systems) * (bar_w + gap) - gap
    width = left + right + len(tests) * (group_w + group_gap)
    height = top + plot_h + bottom
    vmax = nice_max(max(max(v) for _, v in tests))
    y = lambda v: top + plot_h - plot_h * v / vmax
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">'
           f'{html.escape(title)}</text>']
    for k in range(6):
        v = vmax * k / 5
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                   f'stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:,.0f}</text>')
    for g, (name, values) in enumerate(tests):
        x0 = left + group_gap / 2 + g * (group_w + group_gap)
        for i, v in enumerate(values):
            x = x0 + i * (bar_w + gap)
            color = PALETTE[i % len(PALETTE)]
            out.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{bar_w}" '
                       f'height="{top + plot_h - y(v):.1f}" fill="{color}">'
                       f'<title>{html.escape(systems[i])}: {v:,.0f}</title></rect>')
            out.append(f'<text x="{x + bar_w / 2:.1f}" y="{y(v) - 3:.1f}" text-anchor="middle" '
                       f'font-size="8">{v / 1000:.1f}k</text>' if v >= 1000 else
                       f'<text x="{x + bar_w / 2:.1f}" y="{y(v) - 3:.1f}" text-anchor="middle" '
                       f'font-size="8">{v:.0f}</text>')
        out.append(f'<text x="{x0 + group_w / 2:.1f}" y="{top + plot_h + 16}" '
                   f'text-anchor="middle">{html.escape(name)}</text>')
    lx = left
    ly = top + plot_h + 40
    for i, s in enumerate(systems):
        out.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" '
                   f'fill="{PALETTE[i % len(PALETTE)]}"/>')
        out.append(f'<text x="{lx + 16}" y="{ly + 10}">{html.escape(s)}</text>')
        lx += 24 + 7 * len(s)
        if lx > width - 120:
            lx, ly = left, ly + 18
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) != 4:
        raise SystemExit("usage: chart.py IN.csv OUT.svg TITLE")
    systems, tests = read(sys.argv[1])
    with open(sys.argv[2], "w") as f:
        f.write(svg(systems, tests, sys.argv[3]))


if __name__ == "__main__":
    main()
