#!/usr/bin/env python3
"""How separable are the simulated people? A small CNN's held-out accuracy.

Generates (or reuses) a micro-Doppler image folder with
``datasets/microdoppler.py``, splits every person's samples into the first
``--train_per_user`` (training) and the rest (held out; same people, other
random walks), trains a small CNN on the 64x64 grayscale PNGs on the CPU and
prints the held-out accuracy, the per-person accuracy and the run's settings.
With ``--montage PATH`` it also renders a few people's signatures side by side
(128x128, default settings) into a PNG.

    python datasets/separability.py --num_users 31 --train_per_user 96 --test_per_user 32

The figure in ``datasets/README.md`` comes from exactly that command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# numpy's BLAS threads only slow the simulator's small matrix products; torch
# sets its own thread count (--threads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent


def _load_simulator():
    """The simulator package (runnable from a checkout without installing)."""
    sys.path.insert(0, str(HERE.parent))
    from guided_diffusion_vae import simulate

    return simulate


def load_folder(root: Path, train_per_user: int):
    """Read ``root/user_XX/*.png`` -> (x_train, y_train, x_test, y_test, names); x float32 (N, 1, H, W) in [0, 1]."""
    from PIL import Image

    names = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("user_"))
    xs = {"train": [], "test": []}
    ys = {"train": [], "test": []}
    for label, name in enumerate(names):
        files = sorted((root / name).glob("*.png"))
        for i, f in enumerate(files):
            part = "train" if i < train_per_user else "test"
            xs[part].append(np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0)
            ys[part].append(label)
    out = []
    for part in ("train", "test"):
        out += [np.stack(xs[part])[:, None], np.array(ys[part], dtype=np.int64)]
    return (*out, names)


def build_cnn(num_classes: int, image_size: int):
    """Three conv blocks, then the mean over time (columns) keeps the Doppler (row) layout."""
    import torch
    from torch import nn

    class DopplerCNN(nn.Module):
        def __init__(self):
            super().__init__()

            def block(cin, cout):
                return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(inplace=True), nn.MaxPool2d(2))

            self.features = nn.Sequential(block(1, 16), block(16, 32), block(32, 64))
            rows = image_size // 8
            self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * rows, num_classes))

        def forward(self, x):
            f = self.features(x)                    # (N, 64, H/8, W/8)
            return self.head(f.mean(dim=3))         # average over time

    return DopplerCNN()


def train_and_test(x_tr, y_tr, x_te, y_te, num_classes, *, epochs=20, batch=64, lr=2e-3, seed=0, threads=2, log=print):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model = build_cnn(num_classes, x_tr.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * ((len(x_tr) + batch - 1) // batch))
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    xe, ye = torch.from_numpy(x_te), torch.from_numpy(y_te)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if epoch % 5 == 4 or epoch == epochs - 1:
            log(f"  epoch {epoch + 1:2d}: train loss {total / len(xt):.3f}, held-out accuracy {evaluate(model, xe, ye)[0]:.3f}")
    acc, pred = evaluate(model, xe, ye)
    return acc, pred


def evaluate(model, x, y):
    import torch

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y).float().mean()), pred.numpy()


def make_montage(md, path: Path, *, users=6, per_user=4, image_size=128, colormap="gray", seed=0):
    """Render the first ``users`` people's samples 0..per_user-1 (the data set's own walks,
    default settings, at ``image_size``) as a labelled grid PNG; one row per person."""
    from PIL import Image, ImageDraw

    people = md.make_people(users, seed)
    radar = md.Radar()
    settings = md.SpectrogramSettings(image_size=image_size, colormap=colormap)
    gap, label_w = 4, 56
    width = label_w + per_user * (image_size + gap)
    mode = "L" if colormap == "gray" else "RGB"
    canvas = Image.new(mode, (width, users * (image_size + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for u, person in enumerate(people):
        y = gap + u * (image_size + gap)
        draw.text((4, y + image_size // 2 - 12), person.name, fill="black")
        draw.text((4, y + image_size // 2), f"{person.speed_mps:.2f} m/s", fill="black")
        for j in range(per_user):
            rng = md.sample_rng(seed, u, j)
            walk = md.draw_walk(person, rng)
            tile = Image.fromarray(md.render_sample(person, walk, radar, settings, 3.0, rng)).convert(mode)
            canvas.paste(tile, (label_w + j * (image_size + gap), y))
    if mode == "RGB":  # jet has 256 colours: a palette image holds it exactly and is 3x smaller
        canvas = canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default=None, help="existing image folder to use (default: generate into a temp folder)")
    p.add_argument("--num_users", type=int, default=31)
    p.add_argument("--train_per_user", type=int, default=96)
    p.add_argument("--test_per_user", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=1, help="simulator processes")
    p.add_argument("--montage", default=None, help="also write a montage PNG of 6 people x 4 samples at 128x128 here "
                                                   "(e.g. datasets/docs/people.png)")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.add_argument("sim_args", nargs="*", help="extra microdoppler.py options after --, e.g. -- --snr_db 5 20")
    args = p.parse_args(argv)
    import torch

    md = _load_simulator()
    t0 = time.perf_counter()
    tmp = None
    if args.data_dir:
        root = Path(args.data_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="md_sep_")
        root = Path(tmp.name) / "data"
        sim = ["--output_dir", str(root), "--num_users", str(args.num_users),
               "--samples_per_user", str(args.train_per_user + args.test_per_user),
               "--image_size", "64", "--seed", str(args.seed), "--workers", str(args.workers), "--quiet", *args.sim_args]
        print("simulating:", " ".join(sim), flush=True)
        rc = md.main(sim)
        if rc:
            return rc
    t_sim = time.perf_counter() - t0
    x_tr, y_tr, x_te, y_te, names = load_folder(root, args.train_per_user)
    print(f"train {len(x_tr)}, held out {len(x_te)}, {len(names)} people, {x_tr.shape[-1]}x{x_tr.shape[-1]}", flush=True)
    if args.montage:
        make_montage(md, Path(args.montage), seed=args.seed)
    t1 = time.perf_counter()
    acc, pred = train_and_test(x_tr, y_tr, x_te, y_te, len(names), epochs=args.epochs, seed=args.seed,
                               threads=args.threads, log=lambda m: print(m, flush=True))
    t_train = time.perf_counter() - t1
    per_user = [float((pred[y_te == k] == k).mean()) for k in range(len(names))]
    result = {
        "held_out_accuracy": round(acc, 4), "chance": round(1 / len(names), 4),
        "per_user_accuracy_min": round(min(per_user), 3), "per_user_accuracy_max": round(max(per_user), 3),
        "train": int(len(x_tr)), "test": int(len(x_te)), "epochs": args.epochs,
        "simulate_s": round(t_sim, 1), "train_s": round(t_train, 1),
        "torch": torch.__version__, "device": "cpu", "threads": args.threads, "sim_args": args.sim_args,
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
