"""The HTML report (scripts/report.py): one self-contained page, figures beside
it, every name escaped, missing inputs noted, bad paths a UserError."""

import base64
import html
import io
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.report.html import report_defaults, write_report
from guided_diffusion_vae.report.spectrogram_figures import extent_from_metadata, read_extent, spectrogram_figure
from guided_diffusion_vae.report.verdict import CAVEATS, NOT_JUDGED, NOT_USABLE, USABLE, verdict, verdict_text
from guided_diffusion_vae.runtime.images import grid_tiles, image_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVIL = "eve<script>alert(1)"  # a person folder whose name must come out escaped
PEOPLE = ["alice", "bob", EVIL]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class PageParser(HTMLParser):
    """Checks that every opened element is closed in order; collects images, headings and text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.images, self.headings, self.text = [], [], [], [], []
        self._heading = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag in ("h1", "h2", "h3"):
            self._heading = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None

    def handle_data(self, data):
        self.text.append(data)
        if self._heading is not None:
            self._heading.append(data)


def parse(path):
    page = open(path, encoding="utf-8").read()
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == [], (parser.errors, parser.stack)
    return page, parser, " ".join(" ".join(parser.text).split())


def decode_images(parser):
    """Every <img> must be an embedded PNG that PIL opens."""
    out = []
    for attrs in parser.images:
        src = attrs["src"]
        assert src.startswith("data:image/png;base64,"), src[:60]
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(png)) as img:
            img.load()
            assert img.size[0] > 0 and img.size[1] > 0
        out.append(png)
    return out


def spectrogram(seed, size=16):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size), dtype=np.uint8)


def make_inputs(tmp_path, generated_as_npz=False):
    """A fake training run, real/generated folders and an evaluation JSON (no training needed)."""
    run = tmp_path / "run"
    run.mkdir()
    rows = ["step,loss,mse,vb,loss_q0,loss_q1,loss_q2,loss_q3,mse_q0,mse_q1,mse_q2,mse_q3"]
    for step in range(1, 9):
        q = [1.0 / step + i * 0.1 if (step + i) % 3 else "" for i in range(4)]  # some cells empty
        rows.append(",".join(str(v) for v in [step, 1.0 / step, 0.9 / step, 0.01, *q, *q]))
    (run / "progress.csv").write_text("\n".join(rows) + "\n")
    (run / "config.yaml").write_text("batch_size: 4\nlr: 0.0001\nnoise_schedule: cosine\nclass_cond: true\n")
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "metrics.json").write_text(json.dumps({"psnr": 27.5, "ssim": 0.81, "l1": 0.04, "trtr": 0.9,
                                                  "rcas": 0.85, "latent_scale": 0.48, "split": "heldout"}))
    # Laid out as the VAE and the evaluation write them (image_grid): the report splits them into tiles.
    pair = np.stack([spectrogram(k)[..., None] for k in (1, 2, 3, 4)])
    Image.fromarray(image_grid(pair, columns=2)[..., 0]).save(vae / "reconstructions.png")

    real, gen = tmp_path / "real", tmp_path / "gen"
    gen_images, gen_labels = [], []
    for c, person in enumerate(PEOPLE):
        (real / person).mkdir(parents=True)
        (gen / person).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(spectrogram(10 * c + i)).save(real / person / f"{i:03d}.png")
            Image.fromarray(spectrogram(100 + 10 * c + i)).save(gen / person / f"generated_{i:03d}.png")
            gen_images.append(spectrogram(100 + 10 * c + i)[..., None])
            gen_labels.append(sorted(PEOPLE).index(person))
    (gen / "sampling.json").write_text(json.dumps({
        "model": "runs/<b>diffusion</b>/ema_0.9999_005000.safetensors", "step": 5000, "sampler": "ddim", "steps": 50,
        "eta": 0.0, "seed": 0, "guidance": {"kind": "autoguidance", "scale": 2.0, "interval": None,
                                            "guide": {"path": "runs/diffusion/guide/ema.safetensors", "step": 1000}}}))
    if generated_as_npz:
        gen = tmp_path / "samples_9x16x16x1.npz"
        np.savez(gen, np.stack(gen_images), np.asarray(gen_labels))

    ev = tmp_path / "eval"
    ev.mkdir()
    Image.fromarray(image_grid(pair, columns=2)[..., 0]).save(ev / "nearest_pairs.png")
    result = {
        "trtr": 0.84, "cas": 0.79, "rcas": 0.63, "tstr": None,
        "augmentation_gain": {"4": {"real_only": 0.34, "augmented": 0.76, "gain": 0.42, "generated_per_class": 10}},
        "fd": 3.57, "fd_floor": 5.43, "precision": None, "recall": None, "memorised": 1,
        "memorisation": {"threshold": 0.5, "real_median_rms": 0.087, "real_min_ratio": 0.7, "min_ratio": 0.31,
                         "closest": [{"generated": str(gen / "bob" / "generated_001.png"),
                                      "train": str(real / "bob" / "002.png"), "ratio": 0.31, "flagged": True},
                                     {"generated": str(gen / EVIL / "generated_000.png"),
                                      "train": str(real / EVIL / "000.png"), "ratio": 0.77, "flagged": False}],
                         "picture": "nearest_pairs.png"},
        "per_class": {"alice": {"trtr": 0.9, "rcas": 0.7, "cas": 0.95, "n_generated": 3},
                      "bob": {"trtr": 0.8, "rcas": 0.6, "cas": 0.5, "n_generated": 3},
                      EVIL: {"trtr": 0.82, "rcas": 0.6, "cas": 0.92, "n_generated": 3}},
        "notes": {"tstr": "every person needs at least 2 generated samples (the fewest: 1)",
                  "precision": "needs at least 20 images per set, got 9"},
        "counts": {"real_train": 30, "real_test": 9, "generated": 9}, "chance": 1 / 3,
        "classifier": str(ev / "reference_classifier.safetensors"),
        "inputs": {"real_train": str(real), "real_test": str(real), "generated": str(gen), "vae_path": str(vae)},
        "settings": {}, "device": "cpu", "torch": "2", "seconds": 1.0,
    }
    (ev / "metrics.json").write_text(json.dumps(result))
    return run, vae, ev / "metrics.json", result


def test_report_page_holds_every_section_escaped_and_embedded(tmp_path):
    run, vae, eval_json, result = make_inputs(tmp_path)
    out = tmp_path / "site" / "report.html"
    path = write_report(out, eval_json=eval_json, run_dir=run, vae_dir=vae, stage_times={"vae": 12.5, "diffusion":
                        {"seconds": 75.0}}, read_dirs=[tmp_path / "real", tmp_path / "gen"])
    assert path == str(out)
    page, parser, text = parse(path)

    # Self-contained: pictures are data URIs, no scripts, no external files.
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:|#)""", page)
    pngs = decode_images(parser)
    assert len(pngs) == 4  # loss curves, real vs generated, nearest pairs, VAE reconstructions

    # The same figures as files beside the page.
    files = out.parent / "report_files"
    names = sorted(os.listdir(files))
    assert names == ["loss_by_timestep.png", "nearest_pairs.png", "real_vs_generated.png",
                     "vae_reconstructions.png"]
    assert sorted(pngs) == sorted((files / n).read_bytes() for n in names)

    headings = " | ".join(parser.headings)
    for heading in ("Metrics", "Per person", "Training loss by timestep quartile", "Real and generated spectrograms",
                    "Nearest training neighbours", "Configuration", "Stage times"):
        assert heading in headings, heading
    assert str(run.resolve()) in text or str(run) in text
    # No metadata.json beside the real images: every spectrogram figure says its axes count pixels.
    assert text.count("the axes count pixels") == 3

    # Metric values with their ceilings and floors.
    for value in ("0.840", "0.790", "0.630", "+0.420", "3.57", "5.43"):
        assert value in text, value
    assert f"{0.79 / 0.84:.2f} \u00d7 TRTR" in text and f"{3.57 / 5.43:.2f} \u00d7 floor" in text
    assert "not computed: every person needs at least 2 generated samples" in text  # tstr's note
    assert text.count("not computed: needs at least 20 images per set") == 2  # precision and recall

    # Names from files are escaped; the worst CAS person is marked.
    assert "eve&lt;script&gt;alert(1)" in page
    worst = re.findall(r"<tr class=\"worst\"><td><code>([^<]*)</code>", page)
    assert worst == ["bob"]
    assert re.search(r"class=\"flagged\".*?bob/generated_001\.png", page)

    # How the samples were drawn, from their sampling.json (escaped too).
    assert ("Drawn with ddim, 50 steps, eta 0.0, autoguidance 2.0 from the guide runs/diffusion/guide/ema.safetensors "
            "(step 1000); from runs/<b>diffusion</b>/ema_0.9999_005000.safetensors (step 5000), seed 0") in text
    assert "runs/&lt;b&gt;diffusion&lt;/b&gt;" in page

    # Configuration, VAE metrics and stage times.
    assert "noise_schedule" in text and "cosine" in text and "27.5" in text
    assert "1 min 15.0 s" in text and "12.5 s" in text


def test_report_from_npz_without_run_folder_notes_what_is_missing(tmp_path):
    _, _, eval_json, result = make_inputs(tmp_path, generated_as_npz=True)
    os.remove(eval_json.parent / "nearest_pairs.png")
    out = write_report(tmp_path / "r.html", eval_json=eval_json, vae_dir=tmp_path / "nowhere", per_person=2,
                       people=["bob", EVIL, "carol"], read_dirs=f"{tmp_path / 'real'},{result['inputs']['generated']}")
    page, parser, text = parse(out)
    pngs = decode_images(parser)
    assert len(pngs) == 1 and os.listdir(tmp_path / "r_files") == ["real_vs_generated.png"]
    # Two people, two real + two generated tiles each, one labelled row per person.
    with Image.open(io.BytesIO(pngs[0])) as img:
        assert img.size[1] > 2 * 16 * 2
    assert "not found: carol" in text
    assert "loss curves omitted" in text and "No config.yaml found" in text
    assert "Cannot read the pairs picture" in text and "nowhere not found" in text
    assert "Stage times" not in text


def test_report_of_a_run_folder_alone(tmp_path):
    run, _, _, _ = make_inputs(tmp_path)
    page, parser, text = parse(write_report(tmp_path / "x.html", run_dir=run))
    assert len(decode_images(parser)) == 1  # the loss curves
    assert "No evaluation JSON given" in text and "side-by-side omitted" in text


def test_missing_inputs_are_user_errors(tmp_path):
    missing = tmp_path / "no_such" / "metrics.json"
    with pytest.raises(UserError, match=re.escape(str(missing))):
        write_report(tmp_path / "r.html", eval_json=missing)
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "no_run"))):
        write_report(tmp_path / "r.html", run_dir=tmp_path / "no_run")
    with pytest.raises(UserError):
        write_report(tmp_path / "r.html")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json"):
        write_report(tmp_path / "r.html", eval_json=bad)
    assert not (tmp_path / "r.html").exists()


def test_cli(tmp_path):
    assert set(report_defaults()) >= {"run_dir", "eval_json", "vae_dir", "output", "per_person"}
    script = os.path.join(ROOT, "scripts", "report.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    missing = tmp_path / "gone.json"
    proc = subprocess.run([sys.executable, script, "--eval_json", str(missing)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(missing) in lines[0]

    run, _, eval_json, _ = make_inputs(tmp_path)
    proc = subprocess.run([sys.executable, script, "--run_dir", str(run), "--eval_json", str(eval_json),
                           "--per_person", "2", "--read_dirs", f"{tmp_path / 'real'},{tmp_path / 'gen'}"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (run / "report.html").is_file() and (run / "report_files" / "real_vs_generated.png").is_file()
    # The verdict is also the last line printed.
    assert proc.stdout.strip().splitlines()[-1] == verdict_text(json.loads(eval_json.read_text()))
    assert html.escape(EVIL) in (run / "report.html").read_text()


# ---------------------------------------------------------------- the verdict


def good_result(**changes):
    """Metrics that pass every check of the verdict; ``changes`` replace keys (None deletes one)."""
    result = {
        "trtr": 0.90, "cas": 0.88, "rcas": 0.86, "tstr": 0.80, "fd": 8.0, "fd_floor": 7.3,
        "memorised": 0, "memorised_gu": 0, "variety": {"ratio": 1.01, "generated": 0.088, "real": 0.087},
        "augmentation_gain": {"16": {"real_only": 0.65, "augmented": 0.82, "gain": 0.17, "generated_per_class": 100},
                              "all": {"real_only": 0.90, "augmented": 0.92, "gain": 0.02, "generated_per_class": 100}},
        "memorisation": {"threshold": 0.5}, "counts": {"real_train": 2976, "real_test": 992, "generated": 3100},
        "notes": {},
    }
    for key, value in changes.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def test_verdict_of_a_good_result_is_usable_with_its_numbers():
    headline, paragraph = verdict(good_result())
    assert headline == USABLE
    assert paragraph.startswith("Usable for augmentation (TRTR 0.900).")
    for number in ("CAS 0.880 = 0.98 \u00d7 TRTR", "rCAS 0.860", "+0.020 (0.900 \u2192 0.920)", "1.10 \u00d7",
                   "0 of 3,100 samples memorised"):
        assert number in paragraph, number
    assert "Not measured" not in paragraph
    assert verdict_text(good_result()) == "Verdict: " + paragraph


def test_verdict_names_copied_walks_with_their_count():
    headline, paragraph = verdict(good_result(memorised=98, memorised_gu=12,
                                              memorisation={"threshold": 0.5, "copy_ratio_threshold": 0.25}))
    assert headline == CAVEATS
    assert "Samples copy training walks: 98 of 3,100 samples memorised" in paragraph
    assert "12 of 3,100 samples far closer to one training walk than to any other (nearest / second-nearest " \
           "distance < 0.25)" in paragraph
    assert paragraph.count("copy training walks") == 1  # one reason, both counts


def test_verdict_says_when_the_vae_caps_identity_before_the_wrong_person():
    headline, paragraph = verdict(good_result(rcas=0.60, cas=0.55))
    assert headline == NOT_USABLE  # CAS < 0.9 x TRTR blocks
    vae = paragraph.index("The VAE caps identity: rCAS 0.600 = 0.67 \u00d7 TRTR")
    person = paragraph.index("not the right person: CAS 0.550 = 0.61 \u00d7 TRTR")
    assert vae < person  # the cause before its effect
    headline, paragraph = verdict(good_result(rcas=0.60))
    assert headline == CAVEATS and "The VAE caps identity" in paragraph


def test_verdict_reads_the_gain_with_all_real_data_else_the_largest_k():
    hurt = good_result(augmentation_gain={
        "8": {"real_only": 0.50, "augmented": 0.84, "gain": 0.34, "generated_per_class": 100},
        "all": {"real_only": 0.90, "augmented": 0.87, "gain": -0.03, "generated_per_class": 100}})
    headline, paragraph = verdict(hurt)
    assert headline == NOT_USABLE
    assert paragraph.startswith("Not usable for augmentation: the generated data hurt the classifier (TRTR 0.900).")
    assert "hurt the classifier: adding 100 generated per person to all real training data" in paragraph
    assert "-0.030" in paragraph
    gains = {k: {"real_only": 0.5, "augmented": 0.5 + g, "gain": g, "generated_per_class": 10}
             for k, g in (("8", 0.3), ("32", -0.01), ("16", 0.1))}
    headline, paragraph = verdict(good_result(augmentation_gain=gains))
    assert headline == NOT_USABLE and "to 32 real per person" in paragraph


def test_verdict_of_little_variety_and_a_weak_tstr():
    headline, paragraph = verdict(good_result(variety={"ratio": 0.9, "generated": 0.08, "real": 0.089}, tstr=0.6,
                                              fd=20.0))
    assert headline == CAVEATS
    assert "little variety: within-person nearest-neighbour distance of the samples 0.90 \u00d7" in paragraph
    assert "2.74 \u00d7 the real-vs-real floor" in paragraph
    assert "TSTR 0.600 = 0.67 \u00d7 TRTR" in paragraph


def test_verdict_survives_missing_and_null_keys():
    assert verdict({})[0] == NOT_JUDGED
    assert verdict(None)[0] == NOT_JUDGED
    headline, paragraph = verdict({"trtr": 0.9, "rcas": 0.85})  # a VAE-only evaluation
    assert headline == NOT_JUDGED and "no CAS" in paragraph
    # A reference classifier at chance: ratios to it mean nothing.
    headline, paragraph = verdict(good_result(trtr=0.34, cas=0.34, chance=1 / 3))
    assert headline == NOT_JUDGED and "barely tells the people apart (TRTR 0.340, chance 0.333" in paragraph
    assert verdict(good_result(chance=1 / 31))[0] == USABLE
    # An evaluation older than memorised_gu / variety / "all" / spread, or one that left them null.
    older = good_result(memorised_gu=None, variety=None, spread=None)  # keys absent
    assert verdict(older)[0] == USABLE and "Not measured" not in verdict(older)[1]
    nulls = {**good_result(), "memorised_gu": None, "variety": None, "spread": None,
             "augmentation_gain": {"all": None, "16": {"gain": None}}, "notes": {"variety": "too few images"}}
    headline, paragraph = verdict(nulls)  # keys present but null: named as not measured
    assert headline == CAVEATS
    assert "Not measured: the second-nearest copy test; within-person variety: too few images; augmentation " \
           "gain." in paragraph
    headline, paragraph = verdict({"trtr": 0.9, "cas": 0.85, "tstr": None, "augmentation_gain": {},
                                   "notes": {"tstr": "every person needs at least 2 generated samples"}})
    assert headline == CAVEATS  # nothing failed, but no gain was measured
    assert "augmentation gain was not measured" in paragraph
    assert "Not measured: rCAS (no VAE given); memorisation; Frechet distance; augmentation gain; " \
           "TSTR: every person needs at least 2 generated samples." in paragraph


def test_verdict_shows_the_spread_over_classifier_seeds():
    spread = {"cas": {"mean": 0.88, "std": 0.012, "values": [0.87, 0.89]},
              "trtr": {"mean": 0.9, "std": 0.01, "values": [0.89, 0.91]},
              "augmentation_gain_all": {"mean": 0.02, "std": 0.004, "values": [0.016, 0.024]}}
    paragraph = verdict(good_result(spread=spread))[1]
    assert "(TRTR 0.900 \u00b1 0.010)" in paragraph and "CAS 0.880 \u00b1 0.012 = 0.98" in paragraph
    assert "by +0.020 \u00b1 0.004 (0.900" in paragraph


def test_report_leads_with_the_verdict(tmp_path):
    _, _, eval_json, result = make_inputs(tmp_path)
    page, parser, text = parse(write_report(tmp_path / "r.html", eval_json=eval_json))
    box = page.index("<div class=\"verdict")
    assert box < page.index("<nav>") and box < page.index("<h2")
    assert page.index("<h1>") < box and page[:box].count("<p") == 0  # nothing but the title above it
    headline, paragraph = verdict(result)
    assert headline == CAVEATS and "class=\"verdict verdict-caveats\"" in page
    assert "Verdict: " + paragraph in text
    assert "<strong>Usable for augmentation, with caveats</strong>" in page
    # No evaluation: the box says so.
    (tmp_path / "other").mkdir()
    run, _, _, _ = make_inputs(tmp_path / "other")
    page, _, text = parse(write_report(tmp_path / "x.html", run_dir=run))
    assert "verdict-none" in page and "Verdict: <strong>Not judged</strong>: no evaluation JSON given" in page


# ---------------------------------------------------------------- spectrogram axes


def simulated(tmp_path):
    """A tiny simulated data set: its metadata.json is the simulator's own."""
    from guided_diffusion_vae.simulate import simulate_dataset

    return simulate_dataset(tmp_path / "sim", num_users=2, samples_per_user=2, image_size=32, seed=0)


def test_the_simulators_metadata_gives_the_axes_in_seconds_and_metres_per_second(tmp_path):
    folder = simulated(tmp_path)
    extent = read_extent([str(folder / "user_01"), str(folder)])  # a person folder's parent counts too
    assert extent.time_s == (0.0, 3.0) and extent.velocity_mps == (-1.5, 7.5)
    assert extent.doppler_hz[0] == pytest.approx(-240.2, abs=0.5) and extent.source == str(folder / "metadata.json")
    assert read_extent([str(tmp_path), ""]) is None

    tile = np.asarray(Image.open(folder / "user_01" / "000.png").convert("RGB"))
    fig = spectrogram_figure([[[tile, tile], [tile, None]], [[tile, tile], [tile]]], extent,
                             row_labels=[["user_01"], ["user_02"]], group_titles=["real", "generated"])
    axes = fig.axes
    assert len(axes) == 4  # one per row and group
    assert all(ax.get_ylabel() == "v (m/s)" for ax in axes)
    assert [ax.get_xlabel() for ax in axes] == ["", "", "time (s)", "time (s)"]
    bottom = [t.get_text() for t in axes[2].get_xticklabels()]
    assert bottom == ["0", "1", "2"] * 2  # each tile its own 0..3 s
    assert axes[0].get_xticklabels() == []
    assert {t.get_text() for t in axes[0].get_yticklabels()} >= {"0.0", "2.5", "5.0", "7.5"}
    assert axes[0].get_ylim() == (-1.5, 7.5)

    fig = spectrogram_figure([[[tile]]], None, row_labels=[[]])
    assert fig.axes[0].get_xlabel() == "time (pixels)" and fig.axes[0].get_ylabel() == "Doppler (pixels)"
    assert fig.axes[0].get_ylim() == (31.5, -0.5)  # row 0 at the top


def test_report_figures_carry_the_datas_axes(tmp_path):
    folder = simulated(tmp_path)
    _, _, eval_json, result = make_inputs(tmp_path)
    result["inputs"].update(real_test=str(folder), real_train=str(folder), generated=str(folder))
    result["per_class"] = {"user_01": {"trtr": 1.0, "cas": 1.0}, "user_02": {"trtr": 1.0, "cas": 0.5}}
    eval_json.write_text(json.dumps(result))
    # The data and the VAE lie outside the evaluation's folder: named, they may be read.
    page, parser, text = parse(write_report(tmp_path / "r.html", eval_json=eval_json, read_dirs=str(tmp_path)))
    caption = ("3 s of walking left to right; radial velocity -1.5 to 7.5 m/s bottom to top "
               "(positive = towards the radar), i.e. Doppler -240 to 1201 Hz")
    assert text.count(caption) == 3  # real vs generated, nearest pairs, VAE reconstructions
    assert "axes count pixels" not in text and "not a grid" not in text

    # A picture that is not a grid of tiles is still shown, whole, in pixels.
    Image.fromarray(np.concatenate([spectrogram(1), spectrogram(2)])).save(tmp_path / "vae" / "reconstructions.png")
    page, parser, text = parse(write_report(tmp_path / "r.html", eval_json=eval_json, read_dirs=str(tmp_path)))
    assert text.count(caption) == 2 and "not a grid of tiles: drawn whole, its axes in pixels" in text
    assert len(decode_images(parser)) == 3


def test_grid_pictures_are_split_back_into_tiles_or_left_whole():
    tiles = np.random.default_rng(0).integers(0, 255, (6, 5, 7, 1), dtype=np.uint8)
    grid = image_grid(tiles, columns=3)
    rows = grid_tiles(grid, 2, columns=3)
    assert [len(r) for r in rows] == [3, 3]
    assert all((rows[i // 3][i % 3] == tiles[i]).all() for i in range(6))
    square = np.random.default_rng(1).integers(0, 255, (4, 6, 6, 3), dtype=np.uint8)
    assert len(grid_tiles(image_grid(square, columns=2), 2)[0]) == 2  # square tiles: columns found
    assert grid_tiles(grid[:, :-1], 2, columns=3) is None  # does not divide
    assert grid_tiles(np.zeros((32, 16), np.uint8), 2, columns=2) is None  # gutters not background


def test_metric_table_shows_the_copy_test_and_variety_when_present(tmp_path):
    _, _, eval_json, result = make_inputs(tmp_path)
    result.update(memorised_gu=3, variety={"ratio": 0.91, "generated": 0.081, "real": 0.089})
    result["memorisation"].update(copy_ratio_threshold=0.333, min_copy_ratio=0.12)
    eval_json.write_text(json.dumps(result))
    _, _, text = parse(write_report(tmp_path / "r.html", eval_json=eval_json))
    assert "copies (nearest / second-nearest training distance) 3 flagged below 0.333; closest ratio 0.12" in text
    assert "within-person variety (generated / real) 0.910" in text
    result.update(variety=None, notes={"variety": "no person has two generated and two real held-out images"})
    eval_json.write_text(json.dumps(result))
    _, _, text = parse(write_report(tmp_path / "r.html", eval_json=eval_json))
    assert "within-person variety not computed: no person has two generated" in text


def test_other_metadata_files_give_no_units(tmp_path):
    meta = {"format": "microdoppler-image-folder/1", "walk": {"duration_s": 2.5},
            "spectrogram": {"velocity_band_mps": [-2, 6], "doppler_band_hz": [-320, 960]}}
    assert extent_from_metadata(meta).time_s == (0.0, 2.5)
    for broken in ({**meta, "format": "someone-else/3"}, {**meta, "walk": {"duration_s": 0}},
                   {**meta, "spectrogram": {"velocity_band_mps": [6, -2]}}, {**meta, "walk": None}, [], None):
        assert extent_from_metadata(broken) is None, broken
    (tmp_path / "metadata.json").write_text("{not json")
    assert read_extent([str(tmp_path)]) is None
def test_only_the_folders_given_are_read(tmp_path):
    """Issue 21 B2: an evaluation JSON naming a private folder once put that
    folder's pictures, base64, into the page meant to be shared."""
    run, vae, eval_json, result = make_inputs(tmp_path)
    private = tmp_path / "private"
    private.mkdir()
    secret = spectrogram(999)
    Image.fromarray(secret).save(private / "secret.png")
    for person in PEOPLE:
        (private / person).mkdir()
        Image.fromarray(secret).save(private / person / "000.png")
    os.symlink(private, run / "samples")  # a link inside the run folder leads out of it too
    result["inputs"] = {**result["inputs"], "real_test": str(private), "generated": str(private),
                        "vae_path": str(private)}
    result["memorisation"]["picture"] = "../private/secret.png"
    eval_json.write_text(json.dumps(result))
    page, parser, text = parse(write_report(tmp_path / "r.html", eval_json=eval_json, run_dir=run))
    assert len(decode_images(parser)) == 1  # the loss curves, from the run folder
    for what in ("real folder", "generated samples", "pairs picture", "VAE folder"):
        assert f"{what} {private}" in text and "lies outside the folders given" in text, what
    # Named on the command line, the same folder is read.
    page, parser, text = parse(write_report(tmp_path / "r.html", eval_json=eval_json, run_dir=run,
                                            read_dirs=str(private)))
    assert "lies outside" not in text and len(decode_images(parser)) == 3  # loss, side by side, pairs


def test_training_time_evaluations_are_plotted_with_the_kept_step(tmp_path):
    """--eval_interval's eval/metrics.csv becomes one panel per metric; the
    step --keep_best kept is named; a run that did not evaluate has no such section."""
    run, _, eval_json, _ = make_inputs(tmp_path)
    page, parser, text = parse(write_report(tmp_path / "r.html", eval_json=eval_json, run_dir=run))
    assert "Evaluated during training" not in text
    images_before = len(decode_images(parser))
    (run / "eval").mkdir()
    (run / "eval" / "metrics.csv").write_text("step,cas,fd,memorised,memorised_gu,variety\n"
                                              "1000,0.5,40.0,0,0,0.95\n2000,0.8,30.0,3,0,0.9\n3000,0.9,35.0,9,1,\n")
    (run / "best").mkdir()
    (run / "best" / "best.json").write_text(json.dumps({"step": 2000, "metric": "fd", "value": 30.0}))
    page, parser, text = parse(write_report(tmp_path / "r.html", eval_json=eval_json, run_dir=run))
    assert "Evaluated during training" in text and "3 evaluations during training" in text
    assert "The best fd was at step 2000: those weights are kept." in text
    assert len(decode_images(parser)) == images_before + 1
    assert (tmp_path / "r_files" / "training_evaluations.png").stat().st_size > 1000
