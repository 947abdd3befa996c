"""The evaluation metrics on inputs whose answer is known.

Real simulator spectrograms (8 people, 32x32) stand in for generated ones: a
third real split of the same people must score like the real held-out set
(CAS ~ TRTR, TSTR ~ TRTR, Frechet distance ~ its floor, nothing memorised);
shuffled labels must drop CAS to chance; noise must be far and imprecise;
copies of training images must be flagged as memorised.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.training import person_classifier as clf
from guided_diffusion_vae.evaluation import metrics
from guided_diffusion_vae.evaluation.data import load_folder
from guided_diffusion_vae.evaluation.evaluate import run_evaluation
from guided_diffusion_vae.report.verdict import CAVEATS, NOT_USABLE, USABLE, verdict
from guided_diffusion_vae.sampling.sample_io import save_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(classifier_steps=250, classifier_embed_dim=24, augment_k="4", augment_generated=8, num_pairs=4,
            classifier_seeds=1)


def _simulator():
    from guided_diffusion_vae.simulate import simulate_dataset

    return simulate_dataset


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """train (30 per person), test and extra (16 each): the same 8 people, other walks."""
    simulate = _simulator()
    root = tmp_path_factory.mktemp("eval_real")
    for name, seed, count in (("train", 0, 30), ("test", 1, 16), ("extra", 2, 16)):
        simulate(root / name, num_users=8, samples_per_user=count, image_size=32, seed=seed, people_seed=0)
    return root


def _as_generated(folder, images_nchw, labels, class_names):
    """Write images the way the sampling scripts do (PERSON/generated_NNN.png, grid.png, .npz)."""
    label_map = {str(i): n for i, n in enumerate(class_names)}
    return save_samples(str(folder), images_nchw.transpose(0, 2, 3, 1), np.asarray(labels), label_map)


@pytest.fixture(scope="module")
def baseline(real, tmp_path_factory):
    """Real 'extra' images written as samples, evaluated in full (trains the reference classifier)."""
    extra = load_folder(str(real / "extra"), image_size=32, channels=1)
    out = tmp_path_factory.mktemp("eval_baseline")
    _as_generated(out / "generated", extra.images, extra.labels, extra.class_names)
    # Two classifier seeds and every real image: the spread and the full-data gain are exercised once.
    result = run_evaluation(dict(real_train=str(real / "train"), real_test=str(real / "test"),
                                 generated=str(out / "generated"), output_json=str(out / "metrics.json"),
                                 **{**FAST, "augment_k": "all", "classifier_seeds": 2}))
    return out, result


def test_real_samples_score_like_real_held_out(baseline):
    out, result = baseline
    assert result["trtr"] > 0.6  # the 8 simulated people are separable
    assert abs(result["cas"] - result["trtr"]) < 0.12
    assert result["tstr"] > 0.75 * result["trtr"]
    assert result["fd"] < 1.5 * result["fd_floor"]
    assert result["precision"] > 0.7 and result["recall"] > 0.7
    assert result["memorised"] == 0 and result["memorised_gu"] == 0
    # Real walks of the same people are as varied as the real held-out walks.
    assert 0.9 < result["variety"]["ratio"] < 1.1 and result["variety"]["classes"] == 8
    # TSTR and the gains are means over the seeds, each seed's value kept.
    assert len(result["spread"]["tstr"]["values"]) == 2
    assert result["tstr"] == pytest.approx(np.mean(result["spread"]["tstr"]["values"]))
    everything = result["augmentation_gain"]["all"]
    assert everything["gain"] == pytest.approx(np.mean(result["spread"]["augmentation_gain_all"]["values"]))
    # Every real training image, as the reference classifier had (other seeds): about its accuracy.
    assert abs(everything["real_only"] - result["trtr"]) < 0.15
    # The JSON on disk is the returned dict, with the documented keys.
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("trtr", "cas", "rcas", "tstr", "augmentation_gain", "fd", "fd_floor", "precision", "recall",
                "memorised", "memorised_gu", "variety", "spread", "per_class"):
        assert key in saved
    assert saved["cas"] == result["cas"] and saved["rcas"] is None
    assert sorted(saved["per_class"]) == [f"user_{i:02d}" for i in range(1, 9)]
    assert all(v["n_generated"] == 16 for v in saved["per_class"].values())
    assert saved["counts"] == {"real_train": 240, "real_test": 128, "generated": 128}  # grid.png is not a sample
    gain = saved["augmentation_gain"]["all"]
    assert gain["generated_per_class"] == 8 and gain["gain"] == pytest.approx(gain["augmented"] - gain["real_only"])
    assert (out / "nearest_pairs.png").stat().st_size > 100 and (out / "reference_classifier.safetensors").exists()


def test_verdict_reads_an_evaluation_as_written(baseline):
    """The verdict of a real evaluation JSON: every key found, the seeds' spread shown."""
    out, _ = baseline
    result = json.loads((out / "metrics.json").read_text())
    headline, paragraph = verdict(result)
    assert headline in (USABLE, CAVEATS, NOT_USABLE)
    assert f"CAS {result['cas']:.3f} = " in paragraph and "0 of 128 samples memorised" in paragraph
    gain = result["augmentation_gain"]["all"]["gain"]
    std = result["spread"]["augmentation_gain_all"]["std"]
    assert f"to all real training data changes held-out accuracy by {gain:+.3f} \u00b1 {std:.3f}" in paragraph
    assert f"TSTR {result['tstr']:.3f} \u00b1 {result['spread']['tstr']['std']:.3f}" in paragraph
    assert "within-person nearest-neighbour distance" in paragraph
    assert "Not measured: rCAS (no VAE given)." in paragraph


def _rerun(real, baseline, tmp_path, generated, **kw):
    out, _ = baseline
    config = dict(real_train=str(real / "train"), real_test=str(real / "test"), generated=str(generated),
                  output_json=str(tmp_path / "m.json"), classifier_path=str(out / "reference_classifier.safetensors"),
                  **{**FAST, "augment_k": "", **kw})
    return run_evaluation(config)


def test_shuffled_labels_drop_cas_to_chance(real, baseline, tmp_path):
    extra = load_folder(str(real / "extra"), image_size=32, channels=1)
    shuffled = np.random.default_rng(0).permutation(extra.labels)
    # Keep only samples whose shuffled label is wrong, as a derangement would.
    wrong = shuffled != extra.labels
    _as_generated(tmp_path / "gen", extra.images[wrong], shuffled[wrong], extra.class_names)
    result = _rerun(real, baseline, tmp_path, tmp_path / "gen")
    assert result["cas"] < 0.25  # chance is 0.125; the true labels score ~TRTR
    assert result["trtr"] == baseline[1]["trtr"]  # the loaded classifier is the same one


def test_noise_is_far_and_imprecise(real, baseline, tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (128, 1, 32, 32), dtype=np.uint8)
    _as_generated(tmp_path / "gen", noise, np.repeat(np.arange(8), 16), [f"user_{i:02d}" for i in range(1, 9)])
    result = _rerun(real, baseline, tmp_path, tmp_path / "gen")
    assert result["fd"] > 5 * result["fd_floor"]
    assert result["precision"] < 0.05
    assert result["memorised"] == 0


def test_copies_of_training_images_are_memorised(real, baseline, tmp_path):
    train = load_folder(str(real / "train"), image_size=32, channels=1)
    extra = load_folder(str(real / "extra"), image_size=32, channels=1)
    copies = np.arange(0, 240, 24)  # 10 training images, copied exactly
    images = np.concatenate([train.images[copies], extra.images])
    labels = np.concatenate([train.labels[copies], extra.labels])
    np.savez(tmp_path / "samples.npz", arr_0=images.transpose(0, 2, 3, 1), arr_1=labels)  # the .npz input path
    result = _rerun(real, baseline, tmp_path, tmp_path / "samples.npz")
    assert result["memorised"] == 10 and result["memorised_gu"] == 10
    # The report's verdict names both copy counts.
    paragraph = verdict(result)[1]
    assert "Samples copy training walks: 10 of 138 samples memorised" in paragraph
    assert "10 of 138 samples far closer to one training walk than to any other" in paragraph
    closest = result["memorisation"]["closest"]
    assert all(pair["flagged"] and pair["ratio"] == 0 for pair in closest)
    flagged_train = {os.path.basename(p["train"]) for p in closest}
    assert flagged_train <= {os.path.basename(train.files[i]) for i in copies}


def test_time_shifted_training_walks_are_new_walks_not_copies(real, baseline, tmp_path):
    """A walk that starts at another phase of the gait is a new walk: circular
    shifts of training spectrograms along time are flagged by neither test."""
    train = load_folder(str(real / "train"), image_size=32, channels=1)
    picked = np.concatenate([np.flatnonzero(train.labels == c)[:16] for c in range(8)])
    shifts = np.random.default_rng(0).integers(6, 27, len(picked))  # a fifth of the window or more
    shifted = np.stack([np.roll(train.images[i], s, axis=-1) for i, s in zip(picked, shifts)])
    _as_generated(tmp_path / "gen", shifted, train.labels[picked], train.class_names)
    result = _rerun(real, baseline, tmp_path, tmp_path / "gen")
    assert result["memorised"] == 0 and result["memorised_gu"] == 0
    assert result["memorisation"]["min_copy_ratio"] > 1 / 3


def test_copies_of_few_walks_have_little_variety(real, baseline, tmp_path):
    """Samples that repeat two walks per person score far below real variety
    (exact repeats are at distance 0 from each other)."""
    extra = load_folder(str(real / "extra"), image_size=32, channels=1)
    rows = np.concatenate([np.repeat(np.flatnonzero(extra.labels == c)[:2], 8) for c in range(8)])
    _as_generated(tmp_path / "gen", extra.images[rows], extra.labels[rows], extra.class_names)
    result = _rerun(real, baseline, tmp_path, tmp_path / "gen")
    assert result["variety"]["ratio"] < 0.05
    assert result["memorised_gu"] == 0  # repeats of unseen walks copy no training image


def test_second_nearest_ratio_and_variety_on_known_points():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (20, 1, 8, 8), dtype=np.uint8)
    exact = train[:3]
    fresh = rng.integers(0, 256, (5, 1, 8, 8), dtype=np.uint8)
    out = metrics.memorisation_by_second_nearest(np.concatenate([exact, fresh]), train)
    assert list(out["flagged"]) == [0, 1, 2] and list(out["train_index"][:3]) == [0, 1, 2]
    assert np.all(out["ratio"][3:] > 0.6)  # random points: nearest and second nearest alike
    doubled = np.concatenate([train, train[:1]])  # a duplicated training image: both neighbours at 0
    assert metrics.memorisation_by_second_nearest(train[:1], doubled)["ratio"][0] == 0
    labels = np.repeat(np.arange(2), 10)
    same = metrics.within_class_variety(train, labels, train, labels, rng)
    assert same["ratio"] == pytest.approx(1.0) and same["classes"] == 2
    assert metrics.within_class_variety(train[:1], labels[:1], train, labels, rng) is None
    assert metrics.spread([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(np.sqrt(2)), "values": [1.0, 3.0]}


def test_augment_k_lists_counts_and_all():
    from guided_diffusion_vae.evaluation.evaluate import parse_augment_k

    assert parse_augment_k("8, 16,all") == [8, 16, "all"] and parse_augment_k("") == []
    for bad in ("0", "x", "8,-1"):
        with pytest.raises(UserError, match="augment_k"):
            parse_augment_k(bad)


def test_too_few_samples_are_reported_not_scored(real, baseline, tmp_path):
    extra = load_folder(str(real / "extra"), image_size=32, channels=1)
    keep = np.concatenate([np.flatnonzero(extra.labels == c)[:1] for c in range(8)])
    _as_generated(tmp_path / "gen", extra.images[keep], extra.labels[keep], extra.class_names)
    result = _rerun(real, baseline, tmp_path, tmp_path / "gen")
    assert result["cas"] is not None
    for key in ("fd", "fd_floor", "precision", "recall", "tstr"):
        assert result[key] is None, key
    assert {"fd", "precision", "tstr"} <= set(result["notes"])
    assert "24" in result["notes"]["fd"]  # names the embedding size it needs


def test_rcas_scores_vae_reconstructions(real, baseline, tmp_path):
    """An untrained VAE's reconstructions carry no identity: rCAS near chance."""
    from helpers.vae_helpers import make_tiny_vae

    vae = make_tiny_vae(tmp_path / "vae", in_channels=1)
    out, _ = baseline
    result = run_evaluation(dict(real_train=str(real / "train"), real_test=str(real / "test"), vae_path=vae,
                                 output_json=str(tmp_path / "m.json"),
                                 classifier_path=str(out / "reference_classifier.safetensors"), **FAST))
    assert result["rcas"] < 0.3 and result["cas"] is None
    assert all(v["rcas"] is not None for v in result["per_class"].values())


def test_reconstruction_gain_isolates_what_the_vae_does(real, baseline, tmp_path, monkeypatch):
    """With --vae_path and augment_k all, the full-data experiment is repeated
    with VAE reconstructions of training walks in place of generated ones. A
    perfect VAE (reconstruction = input) adds duplicates: no gain; the real
    tiny VAE's reconstructions are what gets mixed in, labelled as their people."""
    from helpers.vae_helpers import make_tiny_vae

    from guided_diffusion_vae.evaluation import evaluate
    from guided_diffusion_vae.report.verdict import verdict

    vae = make_tiny_vae(tmp_path / "vae", in_channels=1)
    extra = load_folder(str(real / "extra"), image_size=32, channels=1)
    _as_generated(tmp_path / "gen", extra.images, extra.labels, extra.class_names)
    seen = []
    real_reconstruct = evaluate.reconstruct_with_vae

    def recording(vae_interface, data):
        out = real_reconstruct(vae_interface, data)
        seen.append((data, out, vae_interface))
        return out

    monkeypatch.setattr(evaluate, "reconstruct_with_vae", recording)
    # The plumbing needs no trained classifier (20 steps); the perfect VAE's gain does (FAST's 250).
    result = _rerun(real, baseline, tmp_path, tmp_path / "gen", vae_path=vae, augment_k="all", classifier_steps=20)
    recon = result["reconstruction_gain"]
    assert recon["reconstructed_per_class"] == 8  # augment_generated, as for the generated samples
    assert recon["real_only"] == result["augmentation_gain"]["all"]["real_only"]
    assert recon["gain"] == pytest.approx(recon["augmented"] - recon["real_only"])
    assert result["spread"]["reconstruction_gain"]["values"] == [pytest.approx(recon["gain"])]
    # rCAS reconstructs the held-out set; the gain the first 8 training walks of each person.
    source, made, loaded = seen[1]
    assert loaded is seen[0][2]  # one VAE loaded for both
    assert len(source) == 64 and np.array_equal(np.bincount(source.labels), [8] * 8)
    assert np.array_equal(made.labels, source.labels) and not np.array_equal(made.images, source.images)
    assert "adding the VAE's reconstructions of training walks instead changes it by" in verdict(result)[1]

    monkeypatch.setattr(evaluate, "reconstruct_with_vae", lambda vae_interface, data: data)
    perfect = _rerun(real, baseline, tmp_path, tmp_path / "gen", vae_path=vae, augment_k="all")
    assert abs(perfect["reconstruction_gain"]["gain"]) < 0.08
    # Without "all" in augment_k there is no full-data experiment to repeat.
    assert _rerun(real, baseline, tmp_path, tmp_path / "gen", vae_path=vae,
                  classifier_steps=20)["reconstruction_gain"] is None


def test_classifier_round_trip_and_mismatch(real, baseline, tmp_path):
    out, _ = baseline
    path = str(out / "reference_classifier.safetensors")
    model, info = clf.load_classifier(path, torch.device("cpu"))
    assert info["class_names"] == [f"user_{i:02d}" for i in range(1, 9)] and info["image_size"] == 32
    test = load_folder(str(real / "test"), image_size=32, channels=1)
    again, _ = clf.load_classifier(path, torch.device("cpu"))
    assert np.array_equal(clf.predict(model, test.images, "cpu"), clf.predict(again, test.images, "cpu"))
    # Another image size than the classifier was trained at is refused, naming the file.
    with pytest.raises(UserError, match="reference_classifier"):
        run_evaluation(dict(real_train=str(real / "train"), real_test=str(real / "test"),
                            generated=str(real / "extra"), output_json=str(tmp_path / "m.json"),
                            classifier_path=path, image_size=64, **FAST))


def test_the_classifier_draws_its_batches_ahead_as_a_step_loop_would():
    """Every step's examples and time shifts are drawn before the first step
    (the loop then never waits on a copy to the GPU), from the same generator
    calls in the same order as drawing them step by step: the same classifier."""
    from guided_diffusion_vae.training.person_classifier import MAX_TIME_SHIFT, _batch_draws, _shifted_in_time

    count, batch, steps, width = 10, 4, 7, 16
    indices, shifts = _batch_draws(count, batch, steps, width, torch.Generator().manual_seed(5), augment=True)
    gen, limit = torch.Generator().manual_seed(5), max(1, int(width * MAX_TIME_SHIFT))
    order, pos = torch.randperm(count, generator=gen), 0
    for step in range(steps):
        if pos + batch > count:  # a new pass over the examples, in a new order
            order, pos = torch.randperm(count, generator=gen), 0
        assert torch.equal(indices[step], order[pos:pos + batch])
        pos += batch
        assert torch.equal(shifts[step], torch.randint(-limit, limit + 1, (batch,), generator=gen))
    assert len(set(indices[:2].flatten().tolist())) == 2 * batch  # no example twice in one pass
    plain, none = _batch_draws(count, batch, steps, width, torch.Generator().manual_seed(5), augment=False)
    assert none is None and torch.equal(plain[:2], indices[:2])  # the first pass draws no shifts before it

    x = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 1, 3, 5)
    moved = _shifted_in_time(x, torch.tensor([2, -1]))
    assert torch.equal(moved[0, 0, :, 2:], x[0, 0, :, :3]) and torch.equal(moved[0, 0, :, :2], x[0, 0, :, :1].expand(3, 2))
    assert torch.equal(moved[1, 0, :, :4], x[1, 0, :, 1:]) and torch.equal(moved[1, 0, :, 4], x[1, 0, :, 4])


def test_frechet_and_precision_recall_on_known_gaussians():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4000, 4)), rng.normal(size=(4000, 4))
    assert metrics.frechet_distance(a, b) < 0.02
    shifted = b + np.array([3.0, 0, 0, 0])
    assert metrics.frechet_distance(a, shifted) == pytest.approx(9.0, abs=0.15)
    wide = b * 2.0  # tr(S_a + S_b - 2 sqrt(S_a S_b)) = 4 * (1 + 4 - 4) = 4
    assert metrics.frechet_distance(a, wide) == pytest.approx(4.0, abs=0.2)
    p, r = metrics.precision_recall(a[:500], b[:500], k=3)
    assert p > 0.9 and r > 0.9
    p, r = metrics.precision_recall(a[:500], shifted[:500] * 0 + 50, k=3)  # a far point mass
    assert p == 0.0 and r == 0.0


def test_cli_writes_json_and_refuses_bad_input(real, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "--real_train", str(real / "train"),
           "--real_test", str(tmp_path / "missing"), "--generated", str(real / "extra"),
           "--output_json", str(tmp_path / "m.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing" in proc.stderr
    assert not (tmp_path / "m.json").exists()
    help_text = subprocess.run(cmd[:2] + ["--help"], capture_output=True, text=True, env=env).stdout
    assert "--generated" in help_text and "default: 250" not in help_text and "(default: 1500)" in help_text


def test_latent_cache_as_real_data(real, tmp_path):
    """A latent cache (with its VAE) stands in for an image folder: its images are
    the VAE's decodings, labelled through the cache's label map."""
    from guided_diffusion_vae.evaluation.evaluate import load_sets, evaluate_defaults
    from guided_diffusion_vae.latent.latent_datasets import build_latent_cache, encode_latents_defaults
    from helpers.vae_helpers import make_tiny_vae

    vae = make_tiny_vae(tmp_path / "vae", in_channels=1)
    build_latent_cache(**{**encode_latents_defaults(), "data_dir": str(real / "test"), "vae_path": vae,
                          "output_dir": str(tmp_path / "cache"), "image_size": 32, "latent_scale": 1.0,
                          "random_flip": True, "num_workers": 0, "progress": False})
    config = dict(evaluate_defaults(), real_train=str(real / "train"), real_test=str(tmp_path / "cache"),
                  vae_path=vae, output_json=str(tmp_path / "m.json"))
    train, test, _, size, channels = load_sets(config, torch.device("cpu"))
    folder = load_folder(str(real / "test"), image_size=32, channels=1)
    assert (size, channels) == (32, 1) and test.images.shape == folder.images.shape  # mirrored copies left out
    assert np.array_equal(test.labels, folder.labels) and test.class_names == train.class_names
    # The decodings are the VAE's round trip of the folder's images.
    from guided_diffusion_vae.evaluation.evaluate import reconstruct_with_vae
    from guided_diffusion_vae.latent.vae_wrapper import VAEInterface

    recon = reconstruct_with_vae(VAEInterface(vae, device="cpu"), folder)
    assert np.abs(recon.images.astype(int) - test.images.astype(int)).max() <= 1


def test_inception_metrics_never_download(real, baseline, tmp_path):
    """FID/KID only from weights on disk: a missing file is refused by name, before any work."""
    out, _ = baseline
    with pytest.raises(UserError, match="inception.pth: file not found"):
        run_evaluation(dict(real_train=str(real / "train"), real_test=str(real / "test"),
                            generated=str(real / "extra"), output_json=str(tmp_path / "m.json"),
                            classifier_path=str(out / "reference_classifier.safetensors"),
                            inception_weights=str(tmp_path / "inception.pth"), **{**FAST, "augment_k": ""}))
    assert not (tmp_path / "m.json").exists()
