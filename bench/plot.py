"""A line chart as a PNG with Pillow (already a dependency; no plotting library needed)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def nice_ticks(lo: float, hi: float, n: int = 6) -> List[float]:
    span = (hi - lo) or 1.0
    raw = span / n
    mag = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 10 ** -len(str(int(1 / raw)))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = step * (lo // step)
    ticks, t = [], start
    while t <= hi + 1e-9:
        if t >= lo - 1e-9:
            ticks.append(round(t, 10))
        t += step
    return ticks


def line_chart(series: Dict[str, List[Tuple[float, float]]], path: str, title: str, xlabel: str, ylabel: str,
               hline: Optional[Tuple[float, str]] = None, size: Tuple[int, int] = (900, 560)) -> None:
    """series: name -> [(x, y), ...]; hline: (y, label) drawn dashed across the plot."""
    from PIL import Image, ImageDraw

    W, H = size
    left, right, top, bottom = 80, 30, 50, 70
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts] + ([hline[0]] if hline else [])
    x0, x1 = min(xs + [0.0]), max(xs)
    ypad = 0.05 * ((max(ys) - min(ys)) or 1.0)
    y0, y1 = min(ys) - ypad, max(ys) + ypad
    px = lambda x: left + (x - x0) / ((x1 - x0) or 1) * (W - left - right)  # noqa: E731
    py = lambda y: H - bottom - (y - y0) / ((y1 - y0) or 1) * (H - top - bottom)  # noqa: E731
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for t in nice_ticks(x0, x1):
        d.line([px(t), H - bottom, px(t), H - bottom + 5], fill="black")
        d.text((px(t) - 10, H - bottom + 8), f"{t:g}", fill="black")
    for t in nice_ticks(y0, y1):
        d.line([left - 5, py(t), left, py(t)], fill="black")
        d.line([left, py(t), W - right, py(t)], fill=(230, 230, 230))
        d.text((left - 45, py(t) - 6), f"{t:g}", fill="black")
    d.text((W // 2 - 4 * len(title), 15), title, fill="black")
    d.text((W // 2 - 3 * len(xlabel), H - 30), xlabel, fill="black")
    d.text((8, top - 25), ylabel, fill="black")
    if hline:
        y = py(hline[0])
        for xa in range(left, W - right, 12):
            d.line([xa, y, min(xa + 6, W - right), y], fill=(120, 120, 120))
        d.text((left + 8, y - 14), hline[1], fill=(90, 90, 90))
    for i, (name, pts) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        pts = sorted(pts)
        d.line([(px(x), py(y)) for x, y in pts], fill=c, width=3)
        for x, y in pts:
            d.ellipse([px(x) - 4, py(y) - 4, px(x) + 4, py(y) + 4], fill=c)
        ly = H - bottom - 18 * (len(series) - i) - 8  # legend: lower right, inside the axes
        d.line([W - right - 190, ly, W - right - 160, ly], fill=c, width=3)
        d.text((W - right - 152, ly - 6), name, fill="black")
    img.save(path)
