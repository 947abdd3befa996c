"""Tables of spectrogram tiles with a time and a Doppler axis, for the report.

A spectrogram's physical extent comes from the data's own description, never
from a guess: the simulator's ``metadata.json`` beside the images
(``walk.duration_s`` seconds across the columns, ``spectrogram.velocity_band_mps``
from the bottom row to the top one, ``spectrogram.doppler_band_hz`` the same
band in Hz). Without one, the axes count pixels and say so.
"""

import io
import json
import math
import os
from dataclasses import dataclass


METADATA_FILE = "metadata.json"  # written by guided_diffusion_vae.simulate beside user_XX/
METADATA_FORMAT = "microdoppler-image-folder/"  # its "format", followed by a version
DPI = 100
TILE_PX = 90  # every tile is drawn this tall: 4 + 4 tiles and their labels fit the page's 1,120 px
FONT = 9
LABEL_CHARS = 22  # a longer row label is cut (an ellipsis) before it runs into the tiles
CHAR_W = 0.095  # inches per character of a row label, about (bold, FONT + 1 points)


@dataclass(frozen=True)
class SpectrogramExtent:
    """What a spectrogram image spans: ``time_s`` (start, end) left to right,
    ``velocity_mps`` (low, high) bottom to top (positive = closing), and the
    same band as ``doppler_hz``; ``source`` the file that said so."""

    time_s: tuple
    velocity_mps: tuple
    doppler_hz: tuple = None
    source: str = ""

    def describe(self):
        """One sentence for a figure's caption."""
        text = (f"Axes from {self.source}: {self.time_s[1] - self.time_s[0]:g} s of walking left to right; "
                f"radial velocity {self.velocity_mps[0]:g} to {self.velocity_mps[1]:g} m/s bottom to top "
                "(positive = towards the radar)")
        if self.doppler_hz:
            text += f", i.e. Doppler {self.doppler_hz[0]:.0f} to {self.doppler_hz[1]:.0f} Hz"
        return text + "."


UNKNOWN_EXTENT_NOTE = ("No spectrogram metadata (the simulator's metadata.json) beside the real images: the axes count "
                       "pixels (pixel row 0 at the top), in no physical unit.")


def _pair(value):
    """(low, high) of two finite numbers with low < high, else None."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
        return None
    low, high = float(value[0]), float(value[1])
    return (low, high) if low < high else None


def extent_from_metadata(meta, source=""):
    """The extent a simulator ``metadata.json`` (a dict) describes, or None."""
    if not isinstance(meta, dict) or not str(meta.get("format", "")).startswith(METADATA_FORMAT):
        return None  # another tool's metadata.json: its keys may mean something else
    walk, spec = meta.get("walk"), meta.get("spectrogram")
    if not isinstance(walk, dict) or not isinstance(spec, dict):
        return None
    duration = walk.get("duration_s")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0 < duration < math.inf:
        return None
    velocity = _pair(spec.get("velocity_band_mps"))
    if velocity is None:
        return None
    return SpectrogramExtent((0.0, float(duration)), velocity, _pair(spec.get("doppler_band_hz")), source)


def read_extent(folders):
    """The extent of the first of ``folders`` (or its parent: a split of a
    data set) with a readable simulator ``metadata.json``; None if none has one."""
    for folder in folders:
        if not folder:
            continue
        folder = os.path.abspath(folder)
        for where in (folder, os.path.dirname(folder)):
            path = os.path.join(where, METADATA_FILE)
            try:
                with open(path, encoding="utf-8") as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                continue
            extent = extent_from_metadata(meta, path)
            if extent is not None:
                return extent
    return None


def _axis_labels(extent):
    if extent is None:
        return "time (pixels)", "Doppler (pixels)"
    return "time (s)", "v (m/s)"


def spectrogram_table(rows, extent, **labels):
    """PNG bytes of :func:`spectrogram_figure`."""
    buf = io.BytesIO()
    spectrogram_figure(rows, extent, **labels).savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def spectrogram_figure(rows, extent, *, row_labels, group_titles=None, tile_titles=None, highlight_rows=(),
                       highlight_tiles=()):
    """A matplotlib figure of spectrogram tiles laid out in rows and groups, with axes.

    :param rows: one entry per row: a list of groups, each a list of (H, W, 3)
        uint8 tiles (or None: an empty, grey place). Every tile has the first
        tile's size; every row the same number of groups.
    :param extent: a :class:`SpectrogramExtent`, or None for pixel axes.
    :param row_labels: per row, a list of lines (the first in bold).
    :param group_titles: a title above each group.
    :param tile_titles: ``{(row, group, index): text}`` shown above a tile.
    :param highlight_rows: row indices labelled in red; ``highlight_tiles``
        ``(row, group, index)`` whose titles are red.

    Each group of a row is one matplotlib axes holding its tiles side by side
    (one axes per tile costs seconds per figure in tick objects): the Doppler
    ticks are labelled at the left of every group, the time ticks under every
    tile of the bottom row.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layout = _figure_layout(rows, row_labels, group_titles, tile_titles)
    fig = Figure(figsize=(layout.width, layout.height), dpi=DPI)
    FigureCanvasAgg(fig)
    coords = _tile_coords(extent, layout)
    tile_titles = tile_titles or {}
    for r, row in enumerate(rows):
        top = layout.top_h + r * (layout.tile_h + layout.row_gap)
        left = layout.label_w + layout.axis_w
        for g, group in enumerate(row):
            _draw_group(fig, layout, coords, group, r, g, left, top, bottom=r == len(rows) - 1,
                        tile_titles=tile_titles, highlight_tiles=highlight_tiles)
            if group_titles and r == 0:
                fig.text((left + layout.group_w[g] / 2) / layout.width, 1 - 0.08 / layout.height, group_titles[g],
                         ha="center", va="top", fontsize=FONT + 2)
            left += layout.group_w[g] + layout.group_gap
        _draw_row_label(fig, row_labels[r] if r < len(row_labels) else [], top + layout.tile_h / 2, layout.width,
                        layout.height, red=r in set(highlight_rows))
    return fig


@dataclass(frozen=True)
class _FigureLayout:
    """Sizes of a :func:`spectrogram_figure`, in inches (``h``, ``w``: a tile's
    pixels; ``places``: tiles per group, the most of any row)."""

    h: int
    w: int
    tile_w: float
    tile_h: float
    places: list
    group_w: list
    label_w: float
    axis_w: float
    group_gap: float
    tile_gap: float
    row_gap: float
    top_h: float
    width: float
    height: float


def _figure_layout(rows, row_labels, group_titles, tile_titles):
    """Where everything goes: every tile is ``TILE_PX`` tall, the row labels
    get the width of the longest (cut at ``LABEL_CHARS``), titles their room."""
    first = next(t for row in rows for group in row for t in group if t is not None)
    h, w = first.shape[:2]
    tile_w, tile_h = TILE_PX * w / h / DPI, TILE_PX / DPI  # inches
    places = [max(len(row[g]) for row in rows) for g in range(len(rows[0]))]
    longest = max((len(str(line)) + (2 if i == 0 else 0) for lines in row_labels for i, line in enumerate(lines)),
                  default=0)
    label_w = min(LABEL_CHARS * CHAR_W, longest * CHAR_W) + 0.25 if longest else 0.2
    axis_w, group_gap, tile_gap = 0.55, 0.65, 0.06
    row_gap = 0.25 if tile_titles else 0.1
    top_h = (0.35 if group_titles else 0.12) + (0.2 if tile_titles else 0.0)
    bottom_h = 0.5
    group_w = [n * tile_w + (n - 1) * tile_gap for n in places]
    width = label_w + axis_w + sum(group_w) + group_gap * (len(places) - 1) + 0.25
    height = top_h + len(rows) * tile_h + (len(rows) - 1) * row_gap + bottom_h
    return _FigureLayout(h, w, tile_w, tile_h, places, group_w, label_w, axis_w, group_gap, tile_gap, row_gap, top_h,
                         width, height)


@dataclass(frozen=True)
class _TileCoords:
    """Data coordinates of the first tile of a group (``step``: from one tile's
    left edge to the next one's), its ticks and the axis labels."""

    x0: float
    x1: float
    y0: float
    y1: float
    step: float
    x_ticks: list
    y_ticks: list
    xlabel: str
    ylabel: str


def _tile_coords(extent, layout):
    """The tiles' data coordinates: physical units, else pixel centres (row 0 at the top)."""
    w, h, tile_w, tile_gap = layout.w, layout.h, layout.tile_w, layout.tile_gap
    xlabel, ylabel = _axis_labels(extent)
    x0, x1, y0, y1 = (*extent.time_s, *extent.velocity_mps) if extent else (-0.5, w - 0.5, h - 0.5, -0.5)
    step = (x1 - x0) * (1 + tile_gap / tile_w)  # from one tile's left edge to the next one's
    x_ticks = _ticks(x0, x1, integer=extent is None, open_end=True)
    y_ticks = _ticks(min(y0, y1), max(y0, y1), integer=extent is None)
    return _TileCoords(x0, x1, y0, y1, step, x_ticks, y_ticks, xlabel, ylabel)


def _draw_group(fig, layout, coords, group, r, g, left, top, *, bottom, tile_titles, highlight_tiles):
    """Group ``g`` of row ``r``: one axes holding its tiles side by side (one
    axes per tile costs seconds per figure in tick objects)."""
    width, height, tile_h = layout.width, layout.height, layout.tile_h
    ax = fig.add_axes([left / width, 1 - (top + tile_h) / height, layout.group_w[g] / width, tile_h / height])
    for spine in ax.spines.values():
        spine.set_visible(False)
    _draw_tiles(ax, coords, group, layout.places[g], r, g, tile_titles, highlight_tiles)
    _set_group_axes(ax, coords, layout.places[g], bottom=bottom)


def _draw_tiles(ax, coords, group, places, r, g, tile_titles, highlight_tiles):
    """The tiles of a group, a grey place for each missing one, each with its title (red when highlighted)."""
    x0, x1, y0, y1, step = coords.x0, coords.x1, coords.y0, coords.y1, coords.step
    for i in range(places):
        tile = group[i] if i < len(group) else None
        box = (x0 + i * step, x1 + i * step, y0, y1)
        if tile is None:
            ax.fill_between(box[:2], y0, y1, color="#eeeeee", lw=0)
        else:
            ax.imshow(tile, extent=box, interpolation="nearest", origin="upper")
        title = tile_titles.get((r, g, i))
        if title:
            red = (r, g, i) in highlight_tiles
            ax.text((box[0] + box[1]) / 2, y1 if y1 > y0 else y1, title, ha="center", va="bottom",
                    fontsize=FONT - 1, color="#b00000" if red else "#333333",
                    fontweight="bold" if red else "normal")


def _set_group_axes(ax, coords, places, *, bottom):
    """A group's limits and ticks: Doppler ticks at its left, time ticks under
    every tile only in the ``bottom`` row (the rows above share them)."""
    x0, x1, y0, y1, step, x_ticks = coords.x0, coords.x1, coords.y0, coords.y1, coords.step, coords.x_ticks
    ax.set_aspect("auto")
    ax.set_xlim(x0, x0 + step * (places - 1) + (x1 - x0))
    ax.set_ylim(y0, y1)
    ax.set_yticks(coords.y_ticks)
    ax.set_ylabel(coords.ylabel, fontsize=FONT - 1, labelpad=1)
    if bottom:
        ax.set_xticks([x + i * step for i in range(places) for x in x_ticks],
                      [f"{x:g}" for _ in range(places) for x in x_ticks])
        ax.set_xlabel(coords.xlabel, fontsize=FONT - 1, labelpad=1)
    else:
        ax.set_xticks([])
    ax.tick_params(labelsize=FONT - 1, length=2.5, pad=1.5)


def _ticks(low, high, integer, *, open_end=False):
    """About four round tick values inside [low, high] (``open_end``: below
    ``high``, where the next tile's first label would collide with it)."""
    from matplotlib.ticker import MaxNLocator

    values = MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10], integer=integer).tick_values(low, high)
    span = high - low
    end = high - 0.05 * span if open_end else high + 1e-9 * span
    return [float(v) for v in values if low - 1e-9 * span <= v <= end]


def _draw_row_label(fig, lines, centre, width, height, *, red):
    if not lines:
        return
    y = centre - 0.09 * (len(lines) - 1)
    for k, line in enumerate(lines):
        text = _fit(("\u25bc " if red and k == 0 else "") + str(line), LABEL_CHARS)
        fig.text(0.08 / width, 1 - (y + 0.18 * k) / height, text, ha="left", va="center",
                 fontsize=FONT + 1 if k == 0 else FONT, fontweight="bold" if k == 0 else "normal",
                 color="#b00000" if red else ("#000000" if k == 0 else "#555555"))


def _fit(text, limit):
    """``text`` cut to ``limit`` characters with an ellipsis (a long name must not run into the tiles)."""
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"
