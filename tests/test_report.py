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

from guided_diffusion_vae.errors import UserError
from guided_diffusion_vae.evaluation.report import report_defaults, write_report

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
    Image.fromarray(np.concatenate([spectrogram(1), spectrogram(2)])).save(vae / "reconstructions.png")

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
    if generated_as_npz:
        gen = tmp_path / "samples_9x16x16x1.npz"
        np.savez(gen, np.stack(gen_images), np.asarray(gen_labels))

    ev = tmp_path / "eval"
    ev.mkdir()
    Image.fromarray(np.concatenate([spectrogram(5), spectrogram(6)])).save(ev / "nearest_pairs.png")
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
    assert html.escape(EVIL) in (run / "report.html").read_text()


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
