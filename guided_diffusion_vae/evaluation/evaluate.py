"""``scripts/evaluate.py``: do generated spectrograms show the right person?

    real_train ──train──▶ reference classifier ──▶ TRTR (real held-out)  the ceiling
                                   │            ├─▶ CAS  (generated, per person)
                                   │            └─▶ rCAS (VAE reconstructions of real held-out)
                                   └─ embedding ──▶ Frechet distance (+ real-vs-real floor),
                                                    precision / recall
    generated ──train──▶ fresh classifier ──▶ TSTR (real held-out)
    k real (+ N generated) per person ──▶ augmentation gain
    generated vs real_train pixels ──▶ memorised samples (two tests)
    generated vs real held-out, per person ──▶ within-person variety

The metrics that train a classifier of their own (TSTR, augmentation gain)
are repeated over ``classifier_seeds`` seeds; the JSON gives their mean and,
under ``spread``, each one's values and standard deviation.

``run_evaluation(config)`` (flags: ``evaluate_defaults()``) returns the result
dict and writes it as JSON (keys documented in README.md), plus a picture of
the closest generated/training pairs beside it. A metric that the inputs are
too small for is ``null`` in the JSON, with the reason under ``notes``.
"""

import math
import os
import time

import numpy as np
import torch

from ..runtime import logger
from ..runtime.files import atomic_write_json, check_writable_target, undone_on_failure
from ..runtime.dist_util import DEVICE_HELP, check_threads, pick_device, set_threads, threads_defaults
from ..runtime.errors import UserError
from ..training import person_classifier as clf
from . import metrics
from ..runtime.images import image_grid, save_png
from ..data.array_datasets import data_folder_defaults, measure_range, parse_db_range, resolve_db_range
from ..data.image_datasets import data_files
from ..latent.latent_datasets import LatentCache
from ..latent.vae_wrapper import VAEInterface, check_vae_dir, read_latent_stats
from .data import (LabelledImages, detect_channels, image_size_of, is_array_folder, is_latent_cache,
                   load_array_folder, load_folder, load_generated, load_latent_cache, per_class_first)

PAIRS_FILE = "nearest_pairs.png"


def evaluate_defaults():
    """Flags of ``scripts/evaluate.py``."""
    return {
        "real_train": "",
        "real_test": "",
        "generated": "",
        "output_json": "",
        "vae_path": "",
        "classifier_path": "",
        "save_classifier": "",
        "image_size": 0,
        "device": "auto",
        "seed": 0,
        **clf.classifier_defaults(),
        "augment_k": "8,16,32,all",
        "augment_generated": 100,
        "classifier_seeds": 3,
        "pr_k": 3,
        "memorisation_threshold": 0.5,
        "copy_ratio_threshold": 1 / 3,
        "num_pairs": 8,
        "inception_weights": "",
        # real .npy/.npz folders: dB -> [-1, 1] (auto: --vae_path's range, else real_train's min and max)
        "db_range": data_folder_defaults()["db_range"],
        **threads_defaults(),
    }


FLAG_HELP = {
    "db_range": "for .npy/.npz folders: LOW,HIGH in dB mapped to [-1, 1] (auto: the range --vae_path stores, "
                "else real_train's min and max)",
    "real_train": "folder of real training images, one sub-folder per person (the reference classifier learns "
                  "these)",
    "real_test": "folder of real held-out images of the same people (never seen by any classifier)",
    "generated": "generated samples: a folder written by the sampling scripts (PERSON/*.png) or their .npz",
    "output_json": "where the metrics JSON goes; nearest_pairs.png and the classifier are written beside it",
    "vae_path": "a diffusers AutoencoderKL folder: adds rCAS, the accuracy on its reconstructions of --real_test, "
                "and with --augment_k all the gain of adding its reconstructions of training walks instead of "
                "generated ones (does the VAE alone hurt the classifier?)",
    "classifier_path": "load this reference classifier (a .safetensors written by an earlier run) instead of "
                       "training one",
    "save_classifier": "where a newly trained reference classifier is saved ('' = beside --output_json)",
    "image_size": "evaluate at this square size (0 = the size of the real training images); others are resized",
    "device": DEVICE_HELP,
    "seed": "seed of every classifier and random subset",
    "augment_k": "comma-separated real images per person for the augmentation-gain experiment ('all': every "
                 "real training image)",
    "classifier_seeds": "seeds of the classifiers trained for TSTR and the augmentation gain: their mean is "
                        "reported, with the spread",
    "augment_generated": "generated images per person added in the augmentation-gain experiment",
    "pr_k": "k of the k-nearest-neighbour manifolds of precision and recall",
    "memorisation_threshold": "flag a sample whose nearest-training distance is below this share of the typical "
                              "real held-out one",
    "copy_ratio_threshold": "flag a sample whose nearest training image is closer than this share of its "
                            "second-nearest (Gu et al. 2025)",
    "num_pairs": "closest generated/training pairs shown in nearest_pairs.png",
    "inception_weights": "optional: Inception weights file on disk for FID/KID via torch-fidelity (never downloaded)",
}


def check_evaluation_config(config):
    """Every setting and input path refused before any work; returns the augmentation ks."""
    for key in ("real_train", "real_test", "output_json"):
        if not config[key]:
            raise UserError(f"--{key} is required")
    if not config["generated"] and not config["vae_path"]:
        raise UserError("nothing to evaluate: give --generated (samples) and/or --vae_path (reconstructions)")
    check_threads(config["threads"])
    for key in ("classifier_steps", "classifier_batch_size", "classifier_width", "classifier_embed_dim", "pr_k",
                "classifier_seeds"):
        if int(config[key]) < 1:
            raise UserError(f"--{key} must be >= 1, got {config[key]}")
    if not config["classifier_lr"] > 0:
        raise UserError(f"--classifier_lr must be positive, got {config['classifier_lr']}")
    if int(config["augment_generated"]) < 0 or int(config["num_pairs"]) < 0:
        raise UserError("--augment_generated and --num_pairs must be >= 0")
    for key in ("memorisation_threshold", "copy_ratio_threshold"):
        if not 0 < config[key] < 1:
            raise UserError(f"--{key} must lie in (0, 1), got {config[key]}")
    ks = parse_augment_k(config["augment_k"])
    parse_db_range(config["db_range"])
    if config["vae_path"]:

        check_vae_dir(config["vae_path"])  # before any classifier is trained
    if config["inception_weights"] and not os.path.isfile(config["inception_weights"]):
        raise UserError(f"--inception_weights {config['inception_weights']}: file not found (it is never downloaded)")
    for key in ("real_train", "real_test", "generated"):
        if config[key] and not os.path.exists(config[key]):
            raise UserError(f"--{key} {config[key]}: no such folder or file")
    if os.path.isdir(config["output_json"]):
        raise UserError(f"--output_json {config['output_json']} is a folder; name a .json file")
    # Created once the inputs have loaded: a failed start leaves no folder.
    check_writable_target(os.path.dirname(os.path.abspath(config["output_json"])), "--output_json")
    return ks


def parse_augment_k(text):
    """``"8,16,all"`` -> ``[8, 16, "all"]``: real images per person in the
    augmentation-gain experiment."""
    ks = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        if part == "all":
            ks.append(part)
            continue
        try:
            k = int(part)
        except ValueError:
            k = 0
        if k < 1:
            raise UserError(f"--augment_k must list integers >= 1 or 'all', got {text!r}")
        ks.append(k)
    return ks


class Evaluation:
    """The sets, the device and the classifier recipe of one evaluation."""

    def __init__(self, config, device):
        self.config, self.device = config, device
        self.notes = {}

    def train(self, data: LabelledImages, seed_offset=0):
        c = self.config
        return clf.train_classifier(
            data.images, data.labels, len(data.class_names), device=self.device, steps=c["classifier_steps"],
            batch_size=c["classifier_batch_size"], lr=c["classifier_lr"], width=c["classifier_width"],
            embed_dim=c["classifier_embed_dim"], seed=c["seed"] + seed_offset)

    def accuracy(self, model, data: LabelledImages):
        return clf.accuracy(clf.predict(model, data.images, self.device), data.labels)

    def seeds(self):
        """Offsets of the repeated classifier seeds (far apart: the
        experiments add small offsets of their own)."""
        return [1000 * i for i in range(int(self.config["classifier_seeds"]))]

    def accuracy_over_seeds(self, train: LabelledImages, test: LabelledImages, seed_offset):
        """Held-out accuracy of a classifier trained on ``train``, once per seed."""
        return [self.accuracy(self.train(train, seed_offset=seed_offset + s), test) for s in self.seeds()]

    def note(self, key, reason):
        self.notes[key] = reason
        logger.log(f"  {key}: not computed: {reason}")


def per_class_accuracy(pred, labels, num_classes):
    """Accuracy of each class ``(num_classes,)``, NaN where a class has no image."""
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            out[c] = float((pred[mask] == c).mean())
    return out


def reconstruct_with_vae(vae, data: LabelledImages):
    """VAE round trip (posterior mean) of ``data``'s images by ``vae`` (a
    :class:`VAEInterface`), as uint8."""
    x = clf.to_input(data.images, vae.device)
    if vae.in_channels != x.shape[1] and not (x.shape[1] == 1 and vae.in_channels == 3):
        raise UserError(f"the VAE in {vae.path} takes {vae.in_channels} channel(s); the images have {x.shape[1]}")
    x = clf.match_channels(x, vae.in_channels)
    vae.latent_shape(tuple(x.shape[-2:]))  # refuses sizes the VAE cannot halve down
    out = []
    for start in range(0, len(x), 256):
        z = vae.encode_unscaled(x[start:start + 256])
        out.append(vae.decode_unscaled(z).float())
    images = clf.to_uint8(clf.match_channels(torch.cat(out), data.images.shape[1]))
    return LabelledImages(images, data.labels, data.class_names, f"VAE({vae.path}) of {data.source}", data.files)


def _fd_and_floor(ev, real_feats, gen_feats, rng):
    """Frechet distance of generated vs real held-out, and the floor: two
    disjoint halves of the real held-out set, at the same sizes."""
    dim = real_feats.shape[1]
    half = len(real_feats) // 2
    n = min(half, len(gen_feats))
    if n <= dim:
        ev.note("fd", f"needs more than {dim} images per set (the embedding size), got {n} "
                      f"(held-out {len(real_feats)} split in halves, generated {len(gen_feats)})")
        return None, None
    order = rng.permutation(len(real_feats))
    a, b = real_feats[order[:half]][:n], real_feats[order[half:2 * half]]
    g = gen_feats[rng.permutation(len(gen_feats))[:n]]
    return metrics.frechet_distance(g, b), metrics.frechet_distance(a, b)


def _augmentation_gain(ev, train, generated, test, ks, spreads):
    """Held-out accuracy with k real per person (or all of them), and with
    k real + N generated, averaged over the classifier seeds."""
    per_class = int(ev.config["augment_generated"])
    gen_counts = generated.counts()
    n_gen = int(min(per_class, gen_counts.min())) if len(gen_counts) else 0
    if n_gen < 1:
        ev.note("augmentation_gain", "every person needs generated samples")
        return {}
    extra = generated.subset(per_class_first(generated, n_gen))
    result = {}
    for k in ks:
        if k == "all":
            few, offset = train, 100
        elif train.counts().min() < k:
            ev.note(f"augmentation_gain_{k}", f"a person has fewer than {k} real training images")
            continue
        else:
            few, offset = train.subset(per_class_first(train, k)), 100 + k
        mixed = LabelledImages(np.concatenate([few.images, extra.images]), np.concatenate([few.labels, extra.labels]),
                               train.class_names, "mixed")
        real_only = ev.accuracy_over_seeds(few, test, offset)
        augmented = ev.accuracy_over_seeds(mixed, test, offset)
        gains = [a - r for a, r in zip(augmented, real_only)]
        spreads[f"real_only_{k}"] = metrics.spread(real_only)
        spreads[f"augmentation_gain_{k}"] = metrics.spread(gains)
        result[str(k)] = {"real_only": float(np.mean(real_only)), "augmented": float(np.mean(augmented)),
                          "gain": float(np.mean(gains)), "generated_per_class": n_gen}
        logger.log(f"  k={k} real per person: {np.mean(real_only):.3f}; plus {n_gen} generated: "
                   f"{np.mean(augmented):.3f} ({np.mean(gains):+.3f} +- {spreads[f'augmentation_gain_{k}']['std']:.3f} "
                   f"over {len(gains)} seed(s))")
    return result


def _reconstruction_gain(ev, train, test, n_per_class, reconstruct, spreads):
    """The full-data augmentation experiment with VAE reconstructions of
    ``n_per_class`` real training walks per person in place of generated ones.
    Reconstructions add no new walk, only the decoder's rendering of known
    ones: a gain this negative says the VAE, not the diffusion model, is what
    hurts the classifier. Reuses the real-only accuracies of the ``all`` gain."""
    n = int(min(n_per_class, train.counts().min()))
    if n < 1:
        ev.note("reconstruction_gain", "every person needs a real training image")
        return None
    recon = reconstruct(train.subset(per_class_first(train, n)))
    mixed = LabelledImages(np.concatenate([train.images, recon.images]), np.concatenate([train.labels, recon.labels]),
                           train.class_names, "real + VAE reconstructions")
    real_only = spreads["real_only_all"]["values"]
    augmented = ev.accuracy_over_seeds(mixed, test, 100)
    gains = [a - r for a, r in zip(augmented, real_only)]
    spreads["reconstruction_gain"] = metrics.spread(gains)
    logger.log(f"  all real per person plus {n} VAE reconstructions of them: {np.mean(augmented):.3f} "
               f"({np.mean(gains):+.3f} +- {spreads['reconstruction_gain']['std']:.3f})")
    return {"real_only": float(np.mean(real_only)), "augmented": float(np.mean(augmented)),
            "gain": float(np.mean(gains)), "reconstructed_per_class": n}


def _pairs_picture(path, generated, train, memo, count):
    """The ``count`` closest generated/training pairs side by side (generated on top)."""

    order = np.argsort(memo["ratio"])[:count]
    if not len(order):
        return []
    top = generated.images[order]
    bottom = train.images[memo["train_index"][order]]
    tiles = np.concatenate([top, bottom]).transpose(0, 2, 3, 1)
    save_png(path, image_grid(tiles, columns=len(order)))
    return [{"generated": os.path.abspath(generated.files[i]) if generated.files[i] else f"{generated.source}[{i}]",
             "train": os.path.abspath(train.files[memo["train_index"][i]]), "ratio": float(memo["ratio"][i]),
             "flagged": bool(memo["ratio"][i] < memo["threshold"])} for i in order]


def _inception_metrics(weights, real: LabelledImages, generated: LabelledImages):
    """Inception FID/KID with torch-fidelity, from weights on disk only."""
    if not os.path.isfile(weights):
        raise UserError(f"--inception_weights {weights}: file not found (it is never downloaded)")
    try:
        import torch_fidelity
    except ImportError:
        raise UserError("--inception_weights needs torch-fidelity: pip install torch-fidelity") from None

    class _Set(torch.utils.data.Dataset):
        def __init__(self, images):
            self.images = images

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            x = torch.from_numpy(self.images[i])
            return x.expand(3, -1, -1) if x.shape[0] == 1 else x

    out = torch_fidelity.calculate_metrics(
        input1=_Set(generated.images), input2=_Set(real.images), fid=True, kid=True, cuda=torch.cuda.is_available(),
        feature_extractor_weights_path=weights, kid_subset_size=min(1000, len(generated), len(real)), verbose=False)
    return {"fid": float(out["frechet_inception_distance"]), "kid": float(out["kernel_inception_distance_mean"])}


def _load_real(path, config, device, image_size, channels, class_names=None, db_range=None):
    """A real set; ``db_range`` (a pair or "measure") maps a folder of arrays."""
    if is_latent_cache(path):
        return load_latent_cache(path, vae_path=config["vae_path"], device=device, image_size=image_size,
                                 channels=channels, class_names=class_names)
    if is_array_folder(path):
        images, used = load_array_folder(path, image_size=image_size, db_range=db_range, class_names=class_names)
        logger.log(f"{path}: spectrograms mapped from {used[0]:g}..{used[1]:g} dB")
        return images
    return load_folder(path, image_size=image_size, channels=channels, class_names=class_names)


def _array_range(config):
    """How real arrays map to [-1, 1]: --db_range, else the VAE's stored range,
    else real_train's own minimum and maximum (one range for both sets)."""
    stored = None
    if config["vae_path"]:
        stored = (read_latent_stats(config["vae_path"]) or {}).get("db_range")
    db_range = resolve_db_range(config["db_range"], stored, f"the VAE {config['vae_path']}")
    if db_range == "measure":
        _, files = data_files(config["real_train"])
        db_range = measure_range(files)
    return db_range


def _geometry(config):
    """(image size, channels) of the evaluation: from the first real folder,
    from the generated samples when the real ones are arrays (which are not
    square), or from a latent cache's meta."""
    for key in ("real_train", "real_test"):
        path = config[key]
        if is_array_folder(path):
            if int(config["image_size"]):
                return int(config["image_size"]), 1
            if config["generated"] and os.path.isdir(config["generated"]):
                return image_size_of(config["generated"]), 1
            raise UserError(f"--{key} {path} holds arrays: give --image_size (the size the model was trained at)")
        if not is_latent_cache(path):
            return int(config["image_size"]) or image_size_of(path), detect_channels(path)

    meta = LatentCache(config["real_train"]).meta
    channels = int(meta.get("channels") or meta["vae"].get("in_channels", 1))
    return int(config["image_size"]) or int(meta["image_size"]), channels


def load_sets(config, device):
    """The real training and held-out sets (and the generated one, if
    given) of ``config``, at one geometry: ``(train, test, generated or
    None, image size, channels)``. Also used by the training monitor."""
    image_size, channels = _geometry(config)
    arrays = any(is_array_folder(config[key]) for key in ("real_train", "real_test"))
    db_range = _array_range(config) if arrays else None
    train = _load_real(config["real_train"], config, device, image_size, channels, db_range=db_range)
    test = _load_real(config["real_test"], config, device, image_size, channels, class_names=train.class_names,
                      db_range=db_range)
    generated = None
    if config["generated"]:
        generated = load_generated(config["generated"], image_size=image_size, channels=channels,
                                   class_names=train.class_names)
    return train, test, generated, image_size, channels


def reference_classifier(ev, train, image_size, channels):
    """``(model, file)``: ``classifier_path`` loaded (refused unless it fits
    ``train``'s classes and the geometry), else one trained on ``train`` with
    ``ev``'s recipe and saved (``save_classifier``, else beside the JSON)."""
    config = ev.config
    if config["classifier_path"]:
        model, info = clf.load_classifier(config["classifier_path"], ev.device)
        if info.get("class_names") != train.class_names or info["image_size"] != image_size \
                or info["in_channels"] != channels:
            raise UserError(f"{config['classifier_path']} was trained on other classes or image geometry "
                            f"({info['in_channels']}x{info['image_size']}px, {len(info.get('class_names', []))} "
                            f"classes; the data are {channels}x{image_size}px, {len(train.class_names)} classes)")
        logger.log(f"reference classifier: loaded {config['classifier_path']}")
        return model, config["classifier_path"]
    logger.log(f"reference classifier: training on {len(train)} real images, {config['classifier_steps']} steps")
    model = ev.train(train)
    path = config["save_classifier"] or os.path.join(os.path.dirname(os.path.abspath(config["output_json"])),
                                                     "reference_classifier.safetensors")
    clf.save_classifier(path, model, {"class_names": train.class_names, "image_size": image_size,
                                      "trained_on": os.path.abspath(config["real_train"]),
                                      "steps": config["classifier_steps"], "seed": config["seed"]})
    return model, path


def run_evaluation(config):
    """Compute every metric the inputs allow; write and return the result dict."""
    config = dict(evaluate_defaults(), **config)
    ks = check_evaluation_config(config)
    set_threads(config["threads"], logger.log)
    started = time.time()
    device = pick_device(config["device"])
    ev = Evaluation(config, device)
    rng = np.random.default_rng(config["seed"])
    train, test, generated, image_size, channels = load_sets(config, device)
    os.makedirs(os.path.dirname(os.path.abspath(config["output_json"])), exist_ok=True)
    num_classes = len(train.class_names)
    logger.log(f"real train {len(train)}, real held-out {len(test)}, generated "
               f"{len(generated) if generated is not None else 0}; {num_classes} classes, "
               f"{channels}x{image_size}px; device {device}")
    model, classifier_file = reference_classifier(ev, train, image_size, channels)
    result = {"trtr": None, "cas": None, "rcas": None, "tstr": None, "augmentation_gain": {},
              "reconstruction_gain": None, "fd": None,
              "fd_floor": None, "precision": None, "recall": None, "memorised": None, "memorised_gu": None,
              "variety": None, "spread": {}}
    test_pred = clf.predict(model, test.images, device)
    result["trtr"] = clf.accuracy(test_pred, test.labels)
    per_class = {"trtr": per_class_accuracy(test_pred, test.labels, num_classes)}
    logger.log(f"TRTR (reference classifier on real held-out): {result['trtr']:.3f}")

    reconstruct = None
    if config["vae_path"]:
        vae = VAEInterface(config["vae_path"], device=device)  # loaded once: rCAS and the reconstruction gain

        def reconstruct(data):
            return reconstruct_with_vae(vae, data)

        recon = reconstruct(test)
        rec_pred = clf.predict(model, recon.images, device)
        result["rcas"] = clf.accuracy(rec_pred, recon.labels)
        per_class["rcas"] = per_class_accuracy(rec_pred, recon.labels, num_classes)
        logger.log(f"rCAS (VAE reconstructions of real held-out): {result['rcas']:.3f}")

    if generated is not None and len(generated):
        _generated_metrics(ev, result, per_class, model, train, test, generated, ks, rng, config, reconstruct)
    elif generated is not None:
        ev.note("cas", "no generated images found")

    counts = {"real_train": int(len(train)), "real_test": int(len(test)),
              "generated": int(len(generated)) if generated is not None else 0}
    result["per_class"] = {
        name: {key: (None if math.isnan(v[c]) else float(v[c])) for key, v in per_class.items()}
        | {"n_generated": int(generated.counts()[c]) if generated is not None else 0}
        for c, name in enumerate(train.class_names)}
    result.update(notes=ev.notes, counts=counts, chance=1.0 / num_classes, classifier=classifier_file,
                  inputs={k: os.path.abspath(config[k]) if config[k] else "" for k in
                          ("real_train", "real_test", "generated", "vae_path")},
                  settings={k: config[k] for k in evaluate_defaults() if k not in ("real_train", "real_test",
                                                                                    "generated", "vae_path")},
                  device=str(device), torch=torch.__version__, seconds=round(time.time() - started, 1))
    atomic_write_json(config["output_json"], result, sort_keys=False)
    logger.log(format_table(result))
    logger.log(f"wrote {config['output_json']}")
    return result


def _generated_metrics(ev, result, per_class, model, train, test, generated, ks, rng, config, reconstruct=None):
    num_classes = len(train.class_names)
    gen_pred = clf.predict(model, generated.images, ev.device)
    result["cas"] = clf.accuracy(gen_pred, generated.labels)
    per_class["cas"] = per_class_accuracy(gen_pred, generated.labels, num_classes)
    logger.log(f"CAS (reference classifier on generated): {result['cas']:.3f}")

    counts = generated.counts()
    if counts.min() < 2:
        ev.note("tstr", f"every person needs at least 2 generated samples (the fewest: {int(counts.min())})")
    else:
        result["spread"]["tstr"] = metrics.spread(ev.accuracy_over_seeds(generated, test, seed_offset=1))
        result["tstr"] = result["spread"]["tstr"]["mean"]
        logger.log(f"TSTR (trained on generated, tested on real held-out): {result['tstr']:.3f} "
                   f"+- {result['spread']['tstr']['std']:.3f}")
    result["augmentation_gain"] = _augmentation_gain(ev, train, generated, test, ks, result["spread"])
    if reconstruct is not None and "all" in result["augmentation_gain"]:
        n = result["augmentation_gain"]["all"]["generated_per_class"]
        result["reconstruction_gain"] = _reconstruction_gain(ev, train, test, n, reconstruct, result["spread"])

    real_feats = clf.embed(model, test.images, ev.device)
    gen_feats = clf.embed(model, generated.images, ev.device)
    result["fd"], result["fd_floor"] = _fd_and_floor(ev, real_feats, gen_feats, rng)
    k = int(config["pr_k"])
    n = min(len(real_feats), len(gen_feats))
    if n < max(4 * k, 20):
        ev.note("precision", f"needs at least {max(4 * k, 20)} images per set, got {n}")
    else:
        real_sub = real_feats[rng.permutation(len(real_feats))[:n]]
        gen_sub = gen_feats[rng.permutation(len(gen_feats))[:n]]
        result["precision"], result["recall"] = metrics.precision_recall(real_sub, gen_sub, k)

    memo = metrics.memorisation(generated.images, train.images, test.images, config["memorisation_threshold"])
    memo["threshold"] = config["memorisation_threshold"]
    result["memorised"] = int(len(memo["flagged"]))
    pairs_path = os.path.join(os.path.dirname(os.path.abspath(config["output_json"])), PAIRS_FILE)
    result["memorisation"] = {
        "threshold": memo["threshold"], "real_median_rms": memo["real_median"],
        "real_min_ratio": memo["real_min_ratio"], "min_ratio": float(memo["ratio"].min()),
        "closest": _pairs_picture(pairs_path, generated, train, memo, int(config["num_pairs"])),
        "picture": PAIRS_FILE if config["num_pairs"] else None}
    if len(train) >= 2:
        gu = metrics.memorisation_by_second_nearest(generated.images, train.images, config["copy_ratio_threshold"])
        result["memorised_gu"] = int(len(gu["flagged"]))
        result["memorisation"].update(copy_ratio_threshold=config["copy_ratio_threshold"],
                                      min_copy_ratio=float(gu["ratio"].min()))
    result["variety"] = metrics.within_class_variety(generated.images, generated.labels, test.images, test.labels,
                                                     rng)
    if result["variety"] is None:
        ev.note("variety", "no person has two generated and two real held-out images")
    if config["inception_weights"]:
        result["inception"] = _inception_metrics(config["inception_weights"], test, generated)


def _fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(result):
    """The metrics as aligned text lines, ceilings and floors beside them."""
    trtr = result["trtr"]

    def rel(v):
        return f"  ({v / trtr:.2f} x TRTR)" if v is not None and trtr else ""

    lines = ["", f"{'metric':<28}{'value':>10}   reference", "-" * 60,
             f"{'TRTR (real held-out)':<28}{_fmt(trtr):>10}   the ceiling; chance {result['chance']:.3f}"]
    for key, label in (("rcas", "rCAS (VAE reconstructions)"), ("cas", "CAS (generated)"),
                       ("tstr", "TSTR (train on generated)")):
        lines.append(f"{label:<28}{_fmt(result[key]):>10}{rel(result[key])}")
    spreads = result.get("spread") or {}

    def pm(key):
        s = spreads.get(key)
        return f" +- {s['std']:.3f} ({len(s['values'])} seeds)" if s and len(s["values"]) > 1 else ""

    if pm("tstr"):
        lines[-1] += "  " + pm("tstr").strip()
    for k, g in result["augmentation_gain"].items():
        lines.append(f"{'aug. gain, ' + k + ' real/person':<28}{g['gain']:>+10.3f}   "
                     f"{g['real_only']:.3f} -> {g['augmented']:.3f} with {g['generated_per_class']} generated"
                     + pm(f"augmentation_gain_{k}"))
    recon = result.get("reconstruction_gain")
    if recon:
        lines.append(f"{'recon. gain, all real/person':<28}{recon['gain']:>+10.3f}   "
                     f"{recon['real_only']:.3f} -> {recon['augmented']:.3f} with {recon['reconstructed_per_class']} "
                     "VAE reconstructions of training walks" + pm("reconstruction_gain"))
    fd, floor = result["fd"], result["fd_floor"]
    lines.append(f"{'Frechet distance':<28}{_fmt(fd, 2):>10}   floor (real vs real) {_fmt(floor, 2)}"
                 + (f", {fd / floor:.2f} x floor" if fd is not None and floor else ""))
    lines.append(f"{'precision / recall':<28}{_fmt(result['precision']):>10}   recall {_fmt(result['recall'])}")
    if result["memorised"] is not None:
        memo = result["memorisation"]
        lines.append(f"{'memorised samples':<28}{result['memorised']:>10}   closest ratio {memo['min_ratio']:.2f} "
                     f"(real held-out: {memo['real_min_ratio']:.2f}; flagged below {memo['threshold']})")
    if result.get("memorised_gu") is not None:
        memo = result["memorisation"]
        lines.append(f"{'copies (nearest/2nd < 1/3)':<28}{result['memorised_gu']:>10}   closest ratio "
                     f"{memo['min_copy_ratio']:.2f} (Gu et al. 2025)")
    if result.get("variety"):
        v = result["variety"]
        lines.append(f"{'within-person variety':<28}{v['ratio']:>10.3f}   x real held-out (nearest-neighbour "
                     f"RMS {v['generated']:.4f} vs {v['real']:.4f})")
    if "inception" in result:
        lines.append(f"{'Inception FID / KID':<28}{result['inception']['fid']:>10.2f}   KID "
                     f"{result['inception']['kid']:.4f}")
    for key, reason in result["notes"].items():
        lines.append(f"  note: {key}: {reason}")
    return "\n".join(lines)


def evaluate_into_folder(config):
    """``scripts/evaluate.py``: the evaluation with its log beside the JSON. An
    evaluation that fails (unreadable samples, a bad classifier) leaves
    nothing of its own there, not even log.txt; settings are checked before
    that folder is touched."""
    config = {key: config[key] for key in evaluate_defaults()}
    check_evaluation_config(config)
    folder = os.path.dirname(os.path.abspath(config["output_json"]))  # required: checked above
    with undone_on_failure(folder, before_undo=logger.close):
        logger.configure(dir=folder, format_strs="stdout,log")
        return run_evaluation(config)
