"""The usage chart's geometry: charged and refunded USD per day per pack, as SVG shapes.

Pure: rows in, rectangles and labels out; the template draws them (no chart
library, no script, nothing for the Content-Security-Policy to allow). Each day
is a group; in it each pack has two bars side by side, charged (solid) and
refunded (pale), in the pack's colour class (``pack-0`` .. ``pack-5``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

__all__ = ["Bar", "Chart", "Tick", "UsagePoint", "usage_chart"]

WIDTH = 960
HEIGHT = 320
LEFT = 90  # room for the y axis labels
BOTTOM = 40  # room for the dates
TOP = 16
RIGHT = 16
COLOURS = 6
BAR_WIDTH_MAX = 40.0
LABELS_MAX = 8  # dates written under the axis, at most


@dataclass(frozen=True, slots=True)
class UsagePoint:
    day: date
    pack: str
    charged_usd_micros: int
    refunded_usd_micros: int


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    css_class: str
    title: str


@dataclass(frozen=True, slots=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    plot_left: int
    plot_bottom: int
    plot_right: int
    bars: list[Bar]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    legend: list[tuple[str, str]]  # (pack, colour class)


def _usd(micros: int) -> str:
    """Exact, as the console's tables print it: two to six decimals."""
    whole, fraction = divmod(micros, 1_000_000)
    return f"${whole:,}.{f'{fraction:06d}'.rstrip('0').ljust(2, '0')}"


def _nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (> 0)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def usage_chart(points: list[UsagePoint], first: date, last: date) -> Chart:
    """Every date from ``first`` to ``last`` is a slot on the time axis (a day
    without runs stays empty); about ten of them are labelled."""
    assert first <= last and all(first <= point.day <= last for point in points)
    packs = sorted({point.pack for point in points})
    days = [first + timedelta(days=offset) for offset in range((last - first).days + 1)]
    label_every = max(1, -(-len(days) // LABELS_MAX))
    colour = {pack: f"pack-{index % COLOURS}" for index, pack in enumerate(packs)}
    top_value = max(
        [p.charged_usd_micros for p in points] + [p.refunded_usd_micros for p in points] + [1]
    )
    scale_max = _nice_ceiling(top_value)
    plot_width = WIDTH - LEFT - RIGHT
    plot_height = HEIGHT - TOP - BOTTOM
    plot_bottom = HEIGHT - BOTTOM
    group = plot_width / max(len(days), 1)
    bar_width = min(BAR_WIDTH_MAX, max(1.0, group * 0.8 / max(2 * len(packs), 1)))
    content = bar_width * 2 * len(packs)
    by_key = {(p.day, p.pack): p for p in points}
    bars: list[Bar] = []
    x_ticks: list[Tick] = []
    for day_index, day in enumerate(days):
        start = LEFT + day_index * group + (group - content) / 2
        if day_index % label_every == 0:
            x_ticks.append(Tick(LEFT + day_index * group + group / 2, day.isoformat()))
        for pack_index, pack in enumerate(packs):
            point = by_key.get((day, pack))
            if point is None:
                continue
            for offset, (amount, kind) in enumerate(
                ((point.charged_usd_micros, "charged"), (point.refunded_usd_micros, "refunded"))
            ):
                height = plot_height * amount / scale_max
                bars.append(
                    Bar(
                        x=round(start + (2 * pack_index + offset) * bar_width, 2),
                        y=round(plot_bottom - height, 2),
                        width=round(bar_width, 2),
                        height=round(height, 2),
                        css_class=f"{colour[pack]} {kind}",
                        title=f"{day.isoformat()} {pack} {kind} {_usd(amount)}",
                    )
                )
    y_ticks = [
        Tick(round(plot_bottom - plot_height * fraction / 4, 2), _usd(scale_max * fraction // 4))
        for fraction in range(5)
    ]
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        plot_left=LEFT,
        plot_bottom=plot_bottom,
        plot_right=WIDTH - RIGHT,
        bars=bars,
        x_ticks=x_ticks,
        y_ticks=y_ticks,
        legend=[(pack, colour[pack]) for pack in packs],
    )
