"""One self-contained HTML page per run (``scripts/report.py``).

:func:`write_report` gathers what a run left behind and writes one HTML file
with every picture embedded as a ``data:`` URI (nothing else is needed to view
it: no scripts, no external files), plus the same figures as PNG files in
``<html stem>_files/`` beside it, for papers. The page opens with the
verdict (:mod:`.verdict`): usable for augmentation or not, and why, with the
numbers. Spectrograms are drawn with a time and a Doppler axis, in seconds
and m/s when the real data's ``metadata.json`` says so, else in pixels
(:mod:`.spectrogram_figures`). Sections:

1. metrics of an evaluation JSON (``scripts/evaluate.py``), each beside its
   ceiling or floor, then one row per person with the worst CAS marked;
2. training loss by quartile of the diffusion timestep (``progress.csv``);
3. real and generated spectrograms of every person, side by side;
4. the generated samples closest to a training image (memorisation check);
5. the run's configuration (``config.yaml``) and the VAE's metrics and
   reconstructions;
6. optional stage times given by the caller.

Inputs: ``eval_json`` (its ``inputs`` name the real held-out folder and the
generated samples) and/or ``run_dir``: a training folder (``progress.csv``,
``config.yaml``) or a quickstart run folder (``diffusion/``, ``vae/``,
``data/``, ``samples/``). A missing optional input leaves a one-line note in
its section; a missing eval JSON or run folder is a :class:`UserError`.

What is read: only files inside the folders the caller names (the run
folder, the evaluation JSON's folder, the VAE folder and ``read_dirs``;
symlinks resolved). A path the evaluation JSON names elsewhere is not read
and leaves a one-line note: the page is made to be shared, and a JSON (maybe
someone else's) must not pull a private folder's pictures into it.
"""

import base64
import csv
import datetime
import html
import io
import json
import math
import os

import numpy as np
from PIL import Image

from ..runtime.errors import UserError
from ..runtime.files import atomic_write_bytes, check_writable_file, read_json_object
from ..runtime.images import grid_tiles
from ..sampling.sample_io import RECORD_FILE
from .spectrogram_figures import UNKNOWN_EXTENT_NOTE, read_extent, spectrogram_table
from .verdict import CAVEATS, NOT_USABLE, USABLE, verdict, verdict_text

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1180px;
       margin: 0 auto; padding: 16px 24px 48px; color: #222; line-height: 1.45; }
h1 { margin-bottom: 4px; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 3px; margin-top: 36px; }
h3 { margin-top: 22px; }
code, pre { font-family: Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0 12px; }
th, td { border: 1px solid #ddd; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.wrap { word-break: break-all; }
tr.worst td { background: #fde4e4; }
tr.flagged td { background: #fde4e4; font-weight: bold; }
.marker { color: #b00; font-weight: bold; white-space: nowrap; }
.note { color: #777; font-style: italic; }
.meta { color: #555; margin-top: 0; }
.missing { color: #999; }
img.figure { max-width: 100%; height: auto; display: block; margin: 6px 0; }
.columns { display: flex; flex-wrap: wrap; gap: 0 18px; align-items: flex-start; }
.columns table { font-size: 0.88em; }
nav ol { columns: 2; }
details summary { cursor: pointer; color: #333; }
.verdict { border: 2px solid; border-left-width: 10px; border-radius: 4px; padding: 10px 16px; margin: 12px 0 18px;
           font-size: 1.05em; }
.verdict p { margin: 0; }
.verdict-good { border-color: #2e7d32; background: #e8f5e9; }
.verdict-caveats { border-color: #e0a000; background: #fff8e1; }
.verdict-bad { border-color: #c62828; background: #fdecea; }
.verdict-none { border-color: #999; background: #f4f4f4; }
"""


def report_defaults():
    """Flags of ``scripts/report.py``."""
    return {
        "run_dir": "",
        "eval_json": "",
        "vae_dir": "",
        "output": "",
        "per_person": 4,
        "people": "",
        "read_dirs": "",
        "title": "guided-diffusion-vae report",
    }


FLAG_HELP = {
    "run_dir": "training folder (progress.csv, config.yaml) or quickstart run folder (diffusion/, vae/, data/, "
               "samples/); '' = none",
    "eval_json": "metrics JSON written by scripts/evaluate.py; its inputs name the real and generated images shown",
    "vae_dir": "VAE folder with metrics.json and reconstructions.png ('' = RUN_DIR/vae, else the evaluation's "
               "vae_path)",
    "output": "the HTML file ('' = RUN_DIR/report.html, else report.html beside --eval_json); figures go to "
              "<stem>_files/ beside it",
    "per_person": "real and generated spectrograms shown per person",
    "people": "comma-separated person names shown side by side ('' = everyone)",
    "read_dirs": "comma-separated folders the report may read besides the run folder, the evaluation JSON's "
                 "folder and the VAE folder (e.g. the real and generated images the evaluation JSON names)",
    "title": "page title",
}


def _e(value):
    """HTML-escaped text of anything (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def _num(value):
    """A finite float, or None (for null, missing, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value, digits=3):
    v = _num(value)
    return "-" if v is None else f"{v:.{digits}f}"


def _note(text):
    return f"<p class=\"note\">{_e(text)}</p>"


class _Figures:
    """Collects the figures: each is written to the ``_files`` folder and embedded."""

    def __init__(self, folder):
        self.folder = folder
        self.written = []

    def add(self, name, png, alt, *, display_width=None):
        """Write ``png`` (bytes) as ``folder/name`` and return its ``<img>`` tag."""

        path = os.path.join(self.folder, name)
        atomic_write_bytes(path, png)
        self.written.append(path)
        with Image.open(io.BytesIO(png)) as img:
            width, height = img.size
        scale = display_width / width if display_width else 1
        data = base64.b64encode(png).decode("ascii")
        return (f"<img src=\"data:image/png;base64,{data}\" alt=\"{_e(alt)}\" class=\"figure\" "
                f"width=\"{round(width * scale)}\" height=\"{round(height * scale)}\">"
                f"<p class=\"meta\">Figure file: <code>{_e(os.path.join(os.path.basename(self.folder), name))}</code>"
                f"</p>")


# ---------------------------------------------------------------- inputs


class _Readable:
    """The folders a report may read (see the module docstring)."""

    def __init__(self, folders):
        self.roots = [os.path.realpath(f) for f in folders if f]

    def allows(self, path):
        real = os.path.realpath(path)
        return any(os.path.commonpath([real, root]) == root for root in self.roots)

    def refusal(self, what, path):
        """The one-line note for a path the report will not read."""
        return (f"{what} {path} lies outside the folders given (run folder, evaluation folder, VAE folder, "
                f"--read_dirs): not read; pass --read_dirs {path} to show it")


def _load_eval(path):
    if not os.path.isfile(path):
        raise UserError(f"evaluation JSON not found: {path}")
    return read_json_object(path)


def _first_file(folders, name):
    for folder in folders:
        if folder and os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _dict(value):
    return value if isinstance(value, dict) else {}


def _image_files(folder):
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [os.path.join(folder, n) for n in names if not n.startswith(".")
            and n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))]


def _class_folders(folder):
    """Sorted names of the sub-folders of ``folder`` (one per person)."""
    try:
        return sorted(d for d in os.listdir(folder) if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))
    except OSError:
        return []


def _read_rgb(path):
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- metrics section


def _reason(result, key):
    """Why metric ``key`` is null: the evaluation's note, or what its inputs lacked."""
    notes = _dict(result.get("notes"))
    inputs = _dict(result.get("inputs"))
    if notes.get(key):
        return str(notes[key])
    related = {"recall": ["precision"], "fd_floor": ["fd"]}.get(key, [])
    for other in related:
        if notes.get(other):
            return str(notes[other])
    if key == "rcas" and not inputs.get("vae_path"):
        return "no VAE given (--vae_path)"
    if key != "trtr" and key != "rcas" and not inputs.get("generated"):
        return "no generated samples given (--generated)"
    if key != "trtr" and key != "rcas" and notes.get("cas"):
        return str(notes["cas"])
    return "no reason recorded"


def _value_cells(result, key, reference, digits=3):
    """The value and reference cells of a metric row; a null metric spans both with its reason."""
    v = _num(result.get(key))
    if v is None:
        return f"<td class=\"missing\" colspan=\"2\">not computed: {_e(_reason(result, key))}</td>"
    return f"<td class=\"num\">{v:.{digits}f}</td><td>{reference}</td>"


def _metric_row(result, label, key, reference, digits=3):
    return f"<tr><th>{_e(label)}</th>{_value_cells(result, key, reference, digits)}</tr>"


def _times_trtr(result, key):
    """A classifier accuracy as a multiple of TRTR, its ceiling ('' if either is missing)."""
    trtr = _num(result.get("trtr"))
    v = _num(result.get(key))
    return f"{v / trtr:.2f} &times; TRTR" if v is not None and trtr else ""


def _classifier_rows(result):
    """TRTR (the ceiling, beside chance), then rCAS, CAS and TSTR as fractions of it."""
    chance = _num(result.get("chance"))
    return [_metric_row(result, "TRTR (reference classifier on real held-out)", "trtr",
                        "the ceiling" + (f"; chance {chance:.3f}" if chance is not None else "")),
            _metric_row(result, "rCAS (VAE reconstructions of real held-out)", "rcas", _times_trtr(result, "rcas")),
            _metric_row(result, "CAS (reference classifier on generated)", "cas", _times_trtr(result, "cas")),
            _metric_row(result, "TSTR (trained on generated, tested on real)", "tstr", _times_trtr(result, "tstr"))]


def _augmentation_rows(result):
    """One row per number of real images per person, fewest first; one 'not computed' row if none."""
    gains = _dict(result.get("augmentation_gain"))
    if not gains:
        return ["<tr><th>augmentation gain</th><td class=\"missing\" colspan=\"2\">not computed: "
                f"{_e(_reason(result, 'augmentation_gain'))}</td></tr>"]
    rows = []
    for k in sorted(gains, key=lambda s: (len(str(s)), str(s))):
        g = _dict(gains[k])
        gain, real_only, augmented = _num(g.get("gain")), _num(g.get("real_only")), _num(g.get("augmented"))
        value = f"<td class=\"num\">{gain:+.3f}</td>" if gain is not None else \
            "<td class=\"missing\">not computed</td>"
        rows.append(f"<tr><th>augmentation gain, {_e(k)} real / person</th>{value}"
                    f"<td>real only {_fmt(real_only)} &rarr; augmented {_fmt(augmented)} "
                    f"(+{_e(g.get('generated_per_class', '?'))} generated / person)</td></tr>")
    recon = _dict(result.get("reconstruction_gain"))
    gain = _num(recon.get("gain"))
    if gain is not None:
        rows.append(f"<tr><th>the same with VAE reconstructions of training walks, all real / person</th>"
                    f"<td class=\"num\">{gain:+.3f}</td><td>real only {_fmt(_num(recon.get('real_only')))} &rarr; "
                    f"with {_e(recon.get('reconstructed_per_class', '?'))} reconstructions / person "
                    f"{_fmt(_num(recon.get('augmented')))}: what the VAE alone does</td></tr>")
    return rows


def _distribution_rows(result):
    """The Frechet distance beside its real-vs-real floor, then precision and recall."""
    fd, floor = _num(result.get("fd")), _num(result.get("fd_floor"))
    reference = f"floor (real vs real) {_fmt(floor, 2)}"
    if fd is not None and floor:
        reference += f"; {fd / floor:.2f} &times; floor"
    return [_metric_row(result, "Frechet distance (classifier features)", "fd", reference, digits=2),
            _metric_row(result, "precision (generated on the real manifold)", "precision", "1 is best"),
            _metric_row(result, "recall (real covered by generated)", "recall", "1 is best")]


def _memorisation_rows(result):
    """Memorised samples, then copies and within-person variety."""
    memo = _dict(result.get("memorisation"))
    memo_ref = ""
    if _num(memo.get("min_ratio")) is not None:
        memo_ref = (f"closest ratio {_fmt(memo.get('min_ratio'), 2)} (real held-out: "
                    f"{_fmt(memo.get('real_min_ratio'), 2)}); flagged below {_e(memo.get('threshold', '?'))}")
    rows = [_metric_row(result, "memorised samples", "memorised", memo_ref, digits=0)]
    # The newer checks: shown when the evaluation has them (an older JSON lacks the keys).
    if "memorised_gu" in result:
        rows.append(_metric_row(result, "copies (nearest / second-nearest training distance)", "memorised_gu",
                                f"flagged below {_fmt(memo.get('copy_ratio_threshold'), 3)}; closest ratio "
                                f"{_fmt(memo.get('min_copy_ratio'), 2)}", digits=0))
    if "variety" in result:
        variety = _dict(result.get("variety"))
        if _num(variety.get("ratio")) is None:
            rows.append(f"<tr><th>within-person variety</th>{_value_cells(result, 'variety', '')}</tr>")
        else:
            rows.append(f"<tr><th>within-person variety (generated / real)</th>"
                        f"<td class=\"num\">{_fmt(variety.get('ratio'), 3)}</td><td>1 is as varied as real walks; "
                        f"nearest-neighbour distance {_fmt(variety.get('generated'), 4)} vs "
                        f"{_fmt(variety.get('real'), 4)}</td></tr>")
    return rows


def _inception_rows(result):
    """Inception FID / KID, when the evaluation computed them."""
    inception = _dict(result.get("inception"))
    if not inception:
        return []
    return [f"<tr><th>Inception FID / KID</th><td class=\"num\">{_fmt(inception.get('fid'), 2)}</td>"
            f"<td>KID {_fmt(inception.get('kid'), 4)}</td></tr>"]


def _notes_list(result):
    """The evaluation's notes as a list ('' if none)."""
    notes = _dict(result.get("notes"))
    if not notes:
        return ""
    return ("<p>Notes of the evaluation:</p><ul>"
            + "".join(f"<li><code>{_e(k)}</code>: {_e(v)}</li>" for k, v in notes.items()) + "</ul>")


def _counts_line(result):
    """One line of image counts, device, torch version and seconds ('' if none)."""
    counts = _dict(result.get("counts"))
    facts = [f"{_e(k.replace('_', ' '))} {_e(v)}" for k, v in counts.items()]
    for key, label in (("device", "device"), ("torch", "torch"), ("seconds", "seconds")):
        if key in result:
            facts.append(f"{label} {_e(result[key])}")
    return f"<p class=\"meta\">Images: {', '.join(facts)}.</p>" if facts else ""


def _inputs_table(result):
    """The evaluation's inputs and its classifier, one row each ('' if none)."""
    inputs = _dict(result.get("inputs"))
    items = [(k, v) for k, v in inputs.items()] + ([("classifier", result["classifier"])] if result.get("classifier")
                                                    else [])
    if not items:
        return ""
    return "<table><tbody>" + "".join(
        f"<tr><th>{_e(k)}</th><td class=\"wrap\"><code>{_e(v) if v else '(none)'}</code></td></tr>"
        for k, v in items) + "</tbody></table>"


def _metrics_section(result):
    """The metrics table (each metric beside its ceiling or floor), then the
    evaluation's notes, image counts and inputs."""
    rows = [*_classifier_rows(result), *_augmentation_rows(result), *_distribution_rows(result),
            *_memorisation_rows(result), *_inception_rows(result)]
    parts = ["<table class=\"metrics\"><thead><tr><th>metric</th><th>value</th><th>ceiling / floor</th></tr>"
             "</thead><tbody>", *rows, "</tbody></table>"]
    return "".join(parts) + _notes_list(result) + _counts_line(result) + _inputs_table(result)


def _cas_colour(value):
    """A light background from red (0) to green (1)."""
    return f"hsl({int(round(120 * min(max(value, 0.0), 1.0)))}, 70%, 85%)"


def _worst_cas(per_class):
    scored = sorted((v["cas"], name) for name, v in per_class.items() if _num(_dict(v).get("cas")) is not None)
    count = max(1, math.ceil(len(scored) / 4)) if scored else 0
    return {name for _, name in scored[:count]}


def _per_person_section(result):
    per_class = {str(k): _dict(v) for k, v in _dict(result.get("per_class")).items()}
    if not per_class:
        return _note("The evaluation JSON has no per-person results (per_class).")
    worst = _worst_cas(per_class)
    has_rcas = any(_num(v.get("rcas")) is not None for v in per_class.values())
    head = ("<tr><th>person</th><th>generated</th><th>TRTR</th><th>CAS</th><th>CAS / TRTR</th>"
            + ("<th>rCAS</th>" if has_rcas else "") + "<th></th></tr>")
    rows = []
    for name in sorted(per_class):
        v = per_class[name]
        trtr, cas = _num(v.get("trtr")), _num(v.get("cas"))
        cas_cell = (f"<td class=\"num\" style=\"background: {_cas_colour(cas)}\">{cas:.3f}</td>" if cas is not None
                    else "<td class=\"missing\">-</td>")
        ratio = f"{cas / trtr:.2f}" if cas is not None and trtr else "-"
        marker = "<span class=\"marker\">&#9660; worst CAS</span>" if name in worst else ""
        row_class = " class=\"worst\"" if name in worst else ""
        rows.append(f"<tr{row_class}><td><code>{_e(name)}</code></td>"
                    f"<td class=\"num\">{_e(v.get('n_generated', '-'))}</td><td class=\"num\">{_fmt(trtr)}</td>"
                    f"{cas_cell}<td class=\"num\">{ratio}</td>"
                    + (f"<td class=\"num\">{_fmt(v.get('rcas'))}</td>" if has_rcas else "")
                    + f"<td>{marker}</td></tr>")
    intro = ("<p>Sorted by name. The CAS cell runs from red (0) to green (1); "
             + ("the lowest CAS is marked &#9660;.</p>" if len(worst) == 1 else
                f"the {len(worst)} lowest CAS are marked &#9660;.</p>" if worst else "no person has a CAS.</p>"))
    return intro + f"<table class=\"per-person\"><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


# ---------------------------------------------------------------- loss curves


def _read_progress(path):
    """``{column: [(step, value), ...]}`` of the numeric cells of a progress.csv."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.DictReader(f))
    series = {}
    for i, row in enumerate(rows):
        try:
            step = float(row.get("step") or i)
        except ValueError:
            step = float(i)
        for key, cell in row.items():
            if key is None or key == "step" or cell in (None, ""):
                continue
            try:
                value = float(cell)
            except ValueError:
                continue
            if math.isfinite(value):
                series.setdefault(key, []).append((step, value))
    return series, len(rows)


def _loss_section(run_dir, figures):
    folders = [run_dir, os.path.join(run_dir, "diffusion")] if run_dir else []
    path = _first_file(folders, "progress.csv")
    if path is None:
        return _note("No training progress.csv found" + (f" in {run_dir}" if run_dir else " (no run folder given)")
                     + ": loss curves omitted.")
    try:
        series, n_rows = _read_progress(path)
    except (OSError, csv.Error) as err:
        return _note(f"Cannot read {path}: {err}; loss curves omitted.")
    total_keys = [k for k in ("loss", "mse", "vb") if any(v > 0 for _, v in series.get(k, []))]
    quart_keys = [f"loss_q{q}" for q in range(4) if any(v > 0 for _, v in series.get(f"loss_q{q}", []))]
    if not total_keys and not quart_keys:
        return _note(f"{path} holds no loss values yet ({n_rows} rows): loss curves omitted.")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 3.8), dpi=150)
    FigureCanvasAgg(fig)
    panels = [("total loss", total_keys), ("loss by quartile of the timestep t", quart_keys)]
    labels = {"loss_q0": "q0: t in [0, T/4) (least noise)", "loss_q1": "q1: t in [T/4, T/2)",
              "loss_q2": "q2: t in [T/2, 3T/4)", "loss_q3": "q3: t in [3T/4, T) (most noise)"}
    colours = {"loss_q0": "#1f77b4", "loss_q1": "#2ca02c", "loss_q2": "#ff7f0e", "loss_q3": "#d62728",
               "loss": "black", "mse": "#1f77b4", "vb": "#9467bd"}
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for key in keys:
            pts = [(s, v) for s, v in series[key] if v > 0]
            marker = "o" if len(pts) < 30 else None
            ax.plot(*zip(*pts), label=labels.get(key, key), color=colours.get(key), lw=1.2, marker=marker, ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if keys:
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color="#888")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    last = []
    for key in ("loss", *[f"loss_q{q}" for q in range(4)]):
        if series.get(key):
            last.append(f"{key} {series[key][-1][1]:.4g}")
    steps = [s for key in series for s, _ in series[key]]
    text = (f"<p>From <code>{_e(path)}</code> ({n_rows} rows, up to step {int(max(steps))}). "
            "Diffusion timesteps split into four quartiles: q0 has the least noise, q3 the most. "
            + (f"Last logged: {_e(', '.join(last))}." if last else "") + "</p>")
    if not quart_keys:
        text += _note("progress.csv has no loss_q0..loss_q3 columns with values: only the total loss is plotted.")
    return text + figures.add("loss_by_timestep.png", buf.getvalue(), "training loss by quartile of the timestep",
                              display_width=1100)


def _eval_curves_section(run_dir, figures):
    """The training-time evaluations (``--eval_interval``: ``eval/metrics.csv``
    of the training folder), one panel per metric, the kept best step marked;
    None when the run did not evaluate during training."""
    folders = [os.path.join(run_dir, "eval"), os.path.join(run_dir, "diffusion", "eval")] if run_dir else []
    path = _first_file(folders, "metrics.csv")
    if path is None:
        return None
    try:
        series, n_rows = _read_progress(path)
    except (OSError, csv.Error) as err:
        return _note(f"Cannot read {path}: {err}; evaluation curves omitted.")
    if not series:
        return _note(f"{path} holds no values yet ({n_rows} rows): evaluation curves omitted.")
    best = {}
    best_file = os.path.join(os.path.dirname(os.path.dirname(path)), "best", "best.json")
    if os.path.isfile(best_file):
        try:
            best = read_json_object(best_file)
        except UserError:
            best = {}

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = list(series)
    fig = Figure(figsize=(2.6 * len(keys), 2.6), dpi=150)
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        ax.plot(*zip(*series[key]), marker="o", ms=3, lw=1.2, color="#1f77b4")
        if best.get("step") is not None and key == best.get("metric"):
            ax.axvline(float(best["step"]), color="#d62728", lw=1, ls="--", label="kept")
            ax.legend(fontsize=7)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    text = (f"<p>From <code>{_e(path)}</code>: {n_rows} evaluations during training, each on the same noise "
            "(a few samples per person: they rank the steps of this run; the evaluation below is the measure).")
    if best.get("step") is not None:
        text += f" The best {_e(best.get('metric'))} was at step {_e(best.get('step'))}: those weights are kept."
    return text + "</p>" + figures.add("training_evaluations.png", buf.getvalue(), "metrics evaluated during training",
                                       display_width=min(1100, 260 * len(keys)))


# ---------------------------------------------------------------- real vs generated


def _generated_source(path, class_names):
    """``{person: [image or path, ...]}`` of a samples folder or ``.npz`` (arr_1 indexes ``class_names``)."""
    if os.path.isdir(path):
        return {name: _image_files(os.path.join(path, name)) for name in _class_folders(path)}
    with np.load(path, allow_pickle=False) as data:
        images = data["arr_0"]
        labels = data["arr_1"] if "arr_1" in data.files else None
    if labels is None or images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError("expected arr_0 uint8 (N, H, W, C) and arr_1 class indices")
    out = {}
    for image, label in zip(images, np.asarray(labels).astype(np.int64)):
        if 0 <= label < len(class_names):
            out.setdefault(class_names[label], []).append(image)
    return out


def _tile(item, size):
    """An (h, w, 3) uint8 tile from a path or an array, resized to ``size`` (h, w); None if unreadable."""
    image = _read_rgb(item) if isinstance(item, str) else np.asarray(item)
    if image is None:
        return None
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    image = image[..., :3].astype(np.uint8)
    if image.shape[:2] != size:
        image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))
    return image


def _axes_note(extent):
    """The caption sentence that says what a figure's axes measure."""
    return f"<p class=\"meta\">{_e(extent.describe() if extent else UNKNOWN_EXTENT_NOTE)}</p>"


def _padded(tiles, count):
    """``tiles`` and None (an empty place) up to ``count``."""
    return list(tiles) + [None] * (count - len(tiles))


def _sampling_line(gen_path):
    """How the samples were drawn, from the ``sampling.json`` in the sample
    folder ``gen_path`` ('' without one)."""
    path = os.path.join(gen_path, RECORD_FILE)
    if not os.path.isfile(path):
        return ""
    try:
        record = read_json_object(path)
    except UserError as err:
        return _note(str(err))
    guidance = _dict(record.get("guidance"))
    kind = str(guidance.get("kind") or "none")
    how = "no guidance" if kind == "none" else f"{_e(kind)} {_e(guidance.get('scale'))}"
    interval = guidance.get("interval")
    if kind != "none" and isinstance(interval, list) and len(interval) == 2:
        how += f" at timesteps {_e(interval[0])}..{_e(interval[1])}"
    guide = _dict(guidance.get("guide"))
    if guide:
        how += f" from the guide <code>{_e(guide.get('path'))}</code> (step {_e(guide.get('step'))})"
    classifier = _dict(guidance.get("classifier"))
    if classifier:
        how += f"; classifier guidance {_e(classifier.get('scale'))} from <code>{_e(classifier.get('path'))}</code>"
    return (f"<p>Drawn with {_e(record.get('sampler'))}, {_e(record.get('steps'))} steps, eta "
            f"{_e(record.get('eta'))}, {how}; from <code>{_e(record.get('model'))}</code> (step "
            f"{_e(record.get('step'))}), seed {_e(record.get('seed'))} (<code>{_e(RECORD_FILE)}</code>).</p>")


def _samples_section(result, run_dir, figures, people, per_person, extent, readable):
    inputs = _dict(result.get("inputs")) if result is not None else {}
    real_dir, gen_path = str(inputs.get("real_test") or ""), str(inputs.get("generated") or "")
    notes = []
    if not real_dir and run_dir and os.path.isdir(os.path.join(run_dir, "data")):
        real_dir = os.path.join(run_dir, "data")
    if not gen_path and run_dir and os.path.isdir(os.path.join(run_dir, "samples")):
        gen_path = os.path.join(run_dir, "samples")
    if real_dir and not readable.allows(real_dir):
        notes.append(readable.refusal("real folder", real_dir))
        real_dir = ""
    if gen_path and not readable.allows(gen_path):
        notes.append(readable.refusal("generated samples", gen_path))
        gen_path = ""
    if real_dir and not os.path.isdir(real_dir):
        notes.append(f"real folder {real_dir} not found")
        real_dir = ""
    if gen_path and not (os.path.isdir(gen_path) or (os.path.isfile(gen_path) and gen_path.endswith(".npz"))):
        notes.append(f"generated samples {gen_path} not found")
        gen_path = ""
    if not real_dir and not gen_path:
        return _note("No real or generated images found (" + ("; ".join(notes) or
                     "the evaluation JSON names none and the run folder has no data/ or samples/")
                     + "): side-by-side omitted.")
    per_class = {str(k): _dict(v) for k, v in _dict(result.get("per_class")).items()} if result is not None else {}
    real_people = _class_folders(real_dir) if real_dir else []
    class_names = sorted(per_class) or real_people
    generated = {}
    if gen_path:
        try:
            generated = _generated_source(gen_path, class_names)
        except (OSError, ValueError, KeyError) as err:
            notes.append(f"cannot read generated samples {gen_path}: {err}")
    everyone = sorted(set(class_names) | set(real_people) | set(generated))
    if people:
        missing = [p for p in people if p not in everyone]
        if missing:
            notes.append("not found: " + ", ".join(missing))
        everyone = [p for p in everyone if p in set(people)]

    rows, size = [], None
    for person in everyone:
        real_items = _image_files(os.path.join(real_dir, person)) if real_dir else []
        items = [real_items[:per_person], generated.get(person, [])[:per_person]]
        tiles = [[], []]
        for k, group in enumerate(items):
            for item in group:
                if size is None:
                    first = _read_rgb(item) if isinstance(item, str) else np.asarray(item)
                    if first is None:
                        continue
                    size = first.shape[:2]
                tile = _tile(item, size)
                if tile is not None:
                    tiles[k].append(tile)
        cas = _num(per_class.get(person, {}).get("cas"))
        trtr = _num(per_class.get(person, {}).get("trtr"))
        label = [person]
        if cas is not None or trtr is not None:
            label.append(f"CAS {_fmt(cas, 2)}  TRTR {_fmt(trtr, 2)}")
        rows.append((label, tiles[0], tiles[1]))
    if size is None:
        return _note("No readable images for the side-by-side (" + ("; ".join(notes) or "empty folders") + ").")
    worst = _worst_cas(per_class)
    png = spectrogram_table([[_padded(real, per_person), _padded(fake, per_person)] for _, real, fake in rows],
                            extent, row_labels=[label for label, _, _ in rows],
                            group_titles=[f"real ({os.path.basename(real_dir.rstrip(os.sep)) or '-'})", "generated"],
                            highlight_rows=[i for i, (label, _, _) in enumerate(rows) if label[0] in worst])
    text = (f"<p>One row per person: up to {per_person} real spectrograms from <code>{_e(real_dir or '(none)')}</code>"
            f", then up to {per_person} generated ones from <code>{_e(gen_path or '(none)')}</code>. "
            "Grey tiles: fewer images than that.</p>")
    if gen_path and os.path.isdir(gen_path):
        text += _sampling_line(gen_path)
    if worst:
        text += (f"<p>Lowest CAS (red, &#9660;): {', '.join(f'<code>{_e(p)}</code>' for p in sorted(worst))}.</p>")
    for note in notes:
        text += _note(note)
    alt = "real and generated spectrograms, one row per person: " + ", ".join(everyone)
    return text + _axes_note(extent) + figures.add("real_vs_generated.png", png, alt)


# ---------------------------------------------------------------- memorisation


def _short(path, depth=2):
    parts = str(path).replace("\\", "/").rstrip("/").split("/")
    return "/".join(parts[-depth:])


def _redrawn_grid(figures, name, png, alt, extent, row_labels, *, columns=None, tile_titles=None,
                  highlight_tiles=()):
    """A picture of spectrogram rows in :func:`image_grid`'s layout, redrawn
    tile by tile with axes; one that is not such a grid is drawn whole, in pixels."""
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    rows = grid_tiles(picture, len(row_labels), columns=columns)
    if rows is None:
        table = spectrogram_table([[[picture]]], None, row_labels=[[]])
        return (_note("The picture is not a grid of tiles: drawn whole, its axes in pixels.")
                + figures.add(name, table, alt))
    table = spectrogram_table([[row] for row in rows], extent, row_labels=[[label] for label in row_labels],
                              tile_titles=tile_titles, highlight_tiles=highlight_tiles)
    return _axes_note(extent) + figures.add(name, table, alt)


def _memorisation_section(result, eval_json, figures, extent, readable):
    if result is None:
        return _note("No evaluation JSON given: nearest-neighbour pairs omitted.")
    memo = _dict(result.get("memorisation"))
    if not memo:
        return _note("Not computed: " + _reason(result, "memorised") + ".")
    parts = [f"<p>For every generated sample, the RMS pixel distance to its nearest training image, as a share of "
             f"the typical real held-out one (median {_fmt(memo.get('real_median_rms'), 4)}). Samples below "
             f"{_e(memo.get('threshold', '?'))} are flagged as memorised; the closest real held-out image has "
             f"{_fmt(memo.get('real_min_ratio'), 2)}, the closest generated one {_fmt(memo.get('min_ratio'), 2)}.</p>"]
    picture = memo.get("picture")
    closest = [c for c in memo.get("closest") or [] if isinstance(c, dict)]
    if picture:
        path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(eval_json)), str(picture)))
        if not readable.allows(path):
            parts.append(_note(readable.refusal("pairs picture", path) + "."))
            picture = None
    if picture:
        try:
            with open(path, "rb") as f:
                png = f.read()
            Image.open(io.BytesIO(png)).verify()
            titles = {(0, 0, i): f"#{i + 1}  ratio {_fmt(c.get('ratio'), 2)}" for i, c in enumerate(closest)}
            flagged = [(0, 0, i) for i, c in enumerate(closest) if c.get("flagged")]
            parts.append("<p>Generated samples (top row) above their nearest training image (bottom row), "
                         "closest first; memorised ones titled in red:</p>"
                         + _redrawn_grid(figures, "nearest_pairs.png", png, "closest generated / training pairs",
                                         extent, ["generated", "nearest training"], columns=len(closest) or None,
                                         tile_titles=titles, highlight_tiles=flagged))
        except (OSError, ValueError) as err:
            parts.append(_note(f"Cannot read the pairs picture {path}: {err}."))
    elif not memo.get("picture"):
        parts.append(_note("The evaluation wrote no pairs picture."))
    if closest:
        rows = []
        for i, c in enumerate(closest):
            flagged = bool(c.get("flagged"))
            gen, train = c.get("generated") or "(array)", c.get("train") or "-"
            row_class = " class=\"flagged\"" if flagged else ""
            mark = "<span class=\"marker\">memorised</span>" if flagged else "no"
            rows.append(f"<tr{row_class}><td class=\"num\">{i + 1}</td>"
                        f"<td title=\"{_e(gen)}\"><code>{_e(_short(gen))}</code></td>"
                        f"<td title=\"{_e(train)}\"><code>{_e(_short(train))}</code></td>"
                        f"<td class=\"num\">{_fmt(c.get('ratio'), 3)}</td>"
                        f"<td>{mark}</td></tr>")
        parts.append("<table class=\"pairs\"><thead><tr><th>#</th><th>generated</th><th>nearest training image</th>"
                     "<th>ratio</th><th>flagged</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    return "".join(parts)


# ---------------------------------------------------------------- configuration


def _value_text(value):
    """A configuration value as YAML would write it (true, null, [1, 2])."""
    if isinstance(value, (dict, list, bool)) or value is None:
        return json.dumps(value, sort_keys=True)
    return str(value)


def _config_section(run_dir, vae_dir, figures, extent, vae_note=None):
    import yaml

    parts = []
    folders = [run_dir, os.path.join(run_dir, "diffusion")] if run_dir else []
    path = _first_file(folders, "config.yaml")
    parts.append("<h3>Training configuration</h3>")
    if path is None:
        parts.append(_note("No config.yaml found" + (f" in {run_dir}" if run_dir else " (no run folder given)") + "."))
    else:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as err:
            text, parts = None, parts + [_note(f"Cannot read {path}: {err}.")]
        if text is not None:
            try:
                config = yaml.safe_load(text)
            except yaml.YAMLError:
                config = None
            parts.append(f"<p class=\"meta\"><code>{_e(path)}</code></p>")
            if isinstance(config, dict) and config:
                items = list(config.items())
                per_column = math.ceil(len(items) / (3 if len(items) > 24 else 2 if len(items) > 8 else 1))
                parts.append("<div class=\"columns\">" + "".join(
                    "<table class=\"config\"><tbody>" + "".join(
                        f"<tr><th><code>{_e(k)}</code></th><td class=\"wrap\"><code>{_e(_value_text(v))}</code>"
                        "</td></tr>" for k, v in items[i:i + per_column]) + "</tbody></table>"
                    for i in range(0, len(items), per_column)) + "</div>")
            else:
                parts.append(f"<pre>{_e(text)}</pre>")

    parts.append("<h3>VAE</h3>")
    if not vae_dir:
        parts.append(_note((vae_note or "No VAE folder given") + ": VAE metrics omitted."))
    elif not os.path.isdir(vae_dir):
        parts.append(_note(f"VAE folder {vae_dir} not found: VAE metrics omitted."))
    else:
        parts.append(f"<p class=\"meta\"><code>{_e(vae_dir)}</code></p>")
        metrics_path = os.path.join(vae_dir, "metrics.json")
        try:
            with open(metrics_path, encoding="utf-8") as f:
                metrics = json.load(f)
        except FileNotFoundError:
            metrics = None
            parts.append(_note(f"No metrics.json in {vae_dir}."))
        except (OSError, ValueError) as err:
            metrics = None
            parts.append(_note(f"Cannot read {metrics_path}: {str(err).splitlines()[0]}."))
        if isinstance(metrics, dict):
            order = ["psnr", "ssim", "l1", "trtr", "rcas", "latent_scale"]
            keys = [k for k in order if k in metrics] + [k for k in metrics if k not in order]
            cells = []
            for k in keys:
                v = _num(metrics[k])
                shown = (f"{v:.4g}" if v is not None and not isinstance(metrics[k], int) else _value_text(metrics[k]))
                cells.append(f"<tr><th>{_e(k)}</th><td class=\"num\">{_e(shown)}</td></tr>")
            parts.append("<table class=\"vae\"><tbody>" + "".join(cells) + "</tbody></table>")
        recon = os.path.join(vae_dir, "reconstructions.png")
        if os.path.isfile(recon):
            try:
                with open(recon, "rb") as f:
                    png = f.read()
                Image.open(io.BytesIO(png)).verify()
                parts.append("<p>Real (top) and reconstructed (bottom):</p>"
                             + _redrawn_grid(figures, "vae_reconstructions.png", png, "VAE reconstructions", extent,
                                             ["real", "reconstructed"]))
            except (OSError, ValueError) as err:
                parts.append(_note(f"Cannot read {recon}: {err}."))
        else:
            parts.append(_note(f"No reconstructions.png in {vae_dir}."))
    return "".join(parts)


def _duration(seconds):
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _stage_times_section(stage_times):
    rows, total = [], 0.0
    for name, value in dict(stage_times).items():
        seconds = _num(value.get("seconds") if isinstance(value, dict) else value)
        if seconds is None:
            rows.append(f"<tr><td>{_e(name)}</td><td class=\"missing\">-</td></tr>")
            continue
        total += seconds
        rows.append(f"<tr><td>{_e(name)}</td><td class=\"num\">{_e(_duration(seconds))}</td></tr>")
    if not rows:
        return _note("No stage times given.")
    rows.append(f"<tr><th>total</th><td class=\"num\"><b>{_e(_duration(total))}</b></td></tr>")
    return "<table class=\"stages\"><thead><tr><th>stage</th><th>time</th></tr></thead><tbody>" \
        + "".join(rows) + "</tbody></table>"


# ---------------------------------------------------------------- the page


def _data_extent(result, run_dir, readable):
    """What the real spectrograms span (the simulator's metadata.json beside
    them); the generated ones and the VAE's share it. None: unknown."""
    inputs = _dict(result.get("inputs")) if result is not None else {}
    folders = [inputs.get("real_test"), inputs.get("real_train")]
    if run_dir:
        folders += [os.path.join(run_dir, "data", "test"), os.path.join(run_dir, "data", "train")]
    return read_extent([str(f) for f in folders if f and readable.allows(str(f))])


VERDICT_STYLE = {USABLE: "verdict-good", CAVEATS: "verdict-caveats", NOT_USABLE: "verdict-bad"}


def _verdict_box(result):
    """The coloured box that opens the page: the verdict, its headline in bold."""
    if result is None:
        headline, text = None, "Not judged: no evaluation JSON given (run scripts/evaluate.py, then pass --eval_json)."
    else:
        headline, text = verdict(result)
    body = _e(text)
    lead = (headline or "not judged")[:1].upper() + (headline or "not judged")[1:]
    if text.startswith(lead):
        body = f"<strong>{_e(lead)}</strong>{_e(text[len(lead):])}"
    return (f"<div class=\"verdict {VERDICT_STYLE.get(headline, 'verdict-none')}\" id=\"verdict\">"
            f"<p>Verdict: {body}</p></div>")


def _comma_list(items):
    """A list or comma-separated text as a list of non-empty strings (None for none)."""
    if items is None:
        return None
    if isinstance(items, str):
        items = items.split(",")
    chosen = [str(p).strip() for p in items if str(p).strip()]
    return chosen or None


def _check_sources(output_html, eval_json, run_dir):
    """Refuse a report with nothing to show, a missing run folder or an output
    that cannot be written, before anything is read or written."""
    if not eval_json and not run_dir:
        raise UserError("nothing to report: give an evaluation JSON (--eval_json) or a run folder (--run_dir)")
    if run_dir and not os.path.isdir(run_dir):
        raise UserError(f"run folder not found: {run_dir}")
    check_writable_file(output_html, "output_html")


def _whole_per_person(per_person):
    """``per_person`` as a whole number of at least 1 (flags arrive as text)."""
    try:
        per_person = int(per_person)
    except (TypeError, ValueError):
        raise UserError(f"per_person must be a whole number, got {per_person!r}") from None
    if per_person < 1:
        raise UserError(f"per_person must be at least 1, got {per_person}")
    return per_person


def _vae_folder(vae_dir, run_dir, result, readable):
    """The VAE folder shown and, when the one the evaluation names may not be
    read, the note that says so: ``vae_dir`` if given, else ``run_dir/vae``,
    else the evaluation's ``vae_path``."""
    vae_note = None
    if vae_dir is None:
        if run_dir and os.path.isdir(os.path.join(run_dir, "vae")):
            vae_dir = os.path.join(run_dir, "vae")
        elif result and _dict(result.get("inputs")).get("vae_path"):
            vae_dir = str(result["inputs"]["vae_path"])
            if not readable.allows(vae_dir):
                vae_note, vae_dir = readable.refusal("VAE folder", vae_dir), None
    return vae_dir, vae_note


def _page_sections(result, eval_json, run_dir, vae_dir, vae_note, stage_times, figures, people, per_person, extent,
                   readable):
    """``(anchor, heading, HTML)`` of every section, in page order (each writes its figures as it goes)."""
    sections = []
    if result is not None:
        sections.append(("metrics", "Metrics", _metrics_section(result)))
        sections.append(("per-person", "Per person", _per_person_section(result)))
    else:
        sections.append(("metrics", "Metrics", _note("No evaluation JSON given: metrics omitted "
                                                     "(run scripts/evaluate.py, then pass --eval_json).")))
    sections.append(("loss", "Training loss by timestep quartile", _loss_section(run_dir, figures)))
    evaluations = _eval_curves_section(run_dir, figures)
    if evaluations is not None:
        sections.append(("evaluations", "Evaluated during training", evaluations))
    sections.append(("samples", "Real and generated spectrograms",
                     _samples_section(result, run_dir, figures, people, per_person, extent, readable)))
    sections.append(("memorisation", "Nearest training neighbours",
                     _memorisation_section(result, eval_json, figures, extent, readable)))
    sections.append(("config", "Configuration", _config_section(run_dir, vae_dir, figures, extent, vae_note)))
    if stage_times:
        sections.append(("stages", "Stage times", _stage_times_section(stage_times)))
    return sections


def _page_head(title, result, eval_json, run_dir, figures):
    """The title, the verdict box and a line naming the inputs and when the page was written."""
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = [f"<h1>{_e(title)}</h1>", _verdict_box(result), "<p class=\"meta\">"]
    if run_dir:
        head.append(f"Run folder: <code>{_e(os.path.abspath(run_dir))}</code><br>")
    if eval_json:
        head.append(f"Evaluation: <code>{_e(os.path.abspath(eval_json))}</code><br>")
    head.append(f"Written {_e(when)}; figures also in <code>{_e(os.path.basename(figures.folder))}/</code>.</p>")
    return "".join(head)


def _page_html(title, head, sections):
    """The whole page: ``head``, a numbered table of contents, then the sections (no scripts, no external files)."""
    nav = "<nav><ol>" + "".join(f"<li><a href=\"#{key}\">{_e(name)}</a></li>" for key, name, _ in sections) \
        + "</ol></nav>"
    body = "\n".join(f"<section id=\"{key}\"><h2>{i + 1}. {_e(name)}</h2>{content}</section>"
                     for i, (key, name, content) in enumerate(sections))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>{head}{nav}\n{body}\n</body></html>\n")


def write_report(output_html, *, eval_json=None, run_dir=None, vae_dir=None, stage_times=None,
                 title="guided-diffusion-vae report", people=None, per_person=4, read_dirs=()) -> str:
    """Write the HTML report and its figures; returns ``output_html``.

    :param eval_json: an evaluation JSON of ``scripts/evaluate.py``.
    :param run_dir: a training folder (``progress.csv``, ``config.yaml``) or a
        quickstart run folder (those under ``diffusion/``; ``vae/``, ``data/``
        and ``samples/`` stand in for what no evaluation JSON names).
    :param vae_dir: a VAE folder (``metrics.json``, ``reconstructions.png``);
        default ``run_dir/vae``, else the evaluation's ``vae_path``.
    :param stage_times: ``{stage: seconds}`` (or ``{stage: {"seconds": s}}``).
    :param people: person names (a list or comma-separated text) shown in the
        side-by-side; None shows everyone.
    :param per_person: real and generated images per person in it.
    :param read_dirs: more folders the report may read (a list or
        comma-separated text); nothing outside them, ``run_dir``, the
        evaluation JSON's folder and ``vae_dir`` is read.
    """
    eval_json = os.fspath(eval_json) if eval_json else None
    run_dir = os.fspath(run_dir) if run_dir else None
    vae_dir = os.fspath(vae_dir) if vae_dir else None
    output_html = os.fspath(output_html)
    _check_sources(output_html, eval_json, run_dir)
    result = _load_eval(eval_json) if eval_json else None
    per_person = _whole_per_person(per_person)
    if os.path.isdir(output_html):
        raise UserError(f"report output {output_html} is a folder; name an .html file")
    people = _comma_list(people)
    readable = _Readable([run_dir, vae_dir, eval_json and os.path.dirname(os.path.abspath(eval_json)),
                          *(_comma_list(read_dirs) or [])])
    vae_dir, vae_note = _vae_folder(vae_dir, run_dir, result, readable)

    extent = _data_extent(result, run_dir, readable)
    stem = os.path.splitext(os.path.basename(output_html))[0] or "report"
    figures = _Figures(os.path.join(os.path.dirname(os.path.abspath(output_html)), f"{stem}_files"))
    sections = _page_sections(result, eval_json, run_dir, vae_dir, vae_note, stage_times, figures, people, per_person,
                              extent, readable)
    page = _page_html(title, _page_head(title, result, eval_json, run_dir, figures), sections)

    atomic_write_bytes(output_html, page.encode("utf-8"))
    return output_html


def default_output(config):
    """Where ``scripts/report.py`` writes without ``--output``: in the run
    folder, else beside the evaluation JSON."""
    if config["output"]:
        return config["output"]
    if config["run_dir"]:
        return os.path.join(config["run_dir"], "report.html")
    if config["eval_json"]:
        return os.path.join(os.path.dirname(os.path.abspath(config["eval_json"])), "report.html")
    return ""


def report_from_flags(config):
    """``scripts/report.py``: write the report and print where, then the verdict."""
    if not config["run_dir"] and not config["eval_json"]:
        raise UserError("nothing to report: give --run_dir, --eval_json or both")
    path = write_report(default_output(config), eval_json=config["eval_json"] or None,
                        run_dir=config["run_dir"] or None, vae_dir=config["vae_dir"] or None,
                        title=config["title"], people=config["people"] or None, per_person=config["per_person"],
                        read_dirs=config["read_dirs"])
    print(f"wrote {path}")
    if config["eval_json"]:
        print(verdict_text(read_json_object(config["eval_json"])))
    return path
