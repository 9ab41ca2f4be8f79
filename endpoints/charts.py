"""Small self-contained SVG charts for the report pages, drawn here: no script, no CDN, no
chart library; the browser shows them as part of the page."""
from __future__ import annotations

from html import escape

from markupsafe import Markup


def share_bars(points: list[tuple[str, float | None]], title: str, width: int = 720,
               height: int = 220) -> Markup:
    """A bar per (label, share 0..1 or None for no data) on a 0-100 % axis."""
    left, bottom, top = 44, 36, 24
    plot_h = height - bottom - top
    n = max(1, len(points))
    slot = (width - left - 10) / n
    bar = max(2.0, slot * 0.7)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" class="chart" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f'<title>{escape(title)}</title>',
             f'<text x="{left}" y="16" font-size="13">{escape(title)}</text>']
    for pct in (0, 50, 100):
        y = top + plot_h * (1 - pct / 100)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" '
                     f'stroke="#ccc"/><text x="{left - 6}" y="{y + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{pct}%</text>')
    label_every = max(1, n // 16)
    for i, (label, share) in enumerate(points):
        x = left + i * slot + (slot - bar) / 2
        if share is not None:
            h = plot_h * max(0.0, min(1.0, share))
            colour = "#2a7" if share >= 0.99 else "#e90" if share >= 0.9 else "#d33"
            parts.append(f'<rect class="bar" x="{x:.1f}" y="{top + plot_h - h:.1f}" '
                         f'width="{bar:.1f}" height="{h:.1f}" fill="{colour}">'
                         f'<title>{escape(label)}: {share * 100:.1f}%</title></rect>')
        if i % label_every == 0:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{height - bottom + 16}" '
                         f'font-size="11" text-anchor="middle">{escape(label)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
