"""The simulator's command line (``python -m guided_diffusion_vae.simulate`` or
``python datasets/microdoppler.py``): one-line errors, exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from .body import PersonVariation, SimulationError, WalkVariation
from .radar import Radar
from .spectrogram import COLORMAPS, SpectrogramSettings
from .dataset import benchmark, simulate_dataset

# Command line
# --------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's code, and the project's)
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    d_radar, d_spec, d_walk, d_pv = Radar(), SpectrogramSettings(), WalkVariation(), PersonVariation()
    p = _Parser(description="Simulate radar micro-Doppler spectrograms of walking people (one folder per person).",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--output_dir", help="folder to create (user_XX/NNN.png, metadata.json, samples.csv); required")
    p.add_argument("--num_users", type=int, default=31, help="people (classes)")
    p.add_argument("--samples_per_user", type=int, default=100, help="spectrograms per person")
    p.add_argument("--image_size", type=int, default=64, choices=(32, 64, 128, 256), help="square image side (px)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples (and of the people unless --people_seed)")
    p.add_argument("--people_seed", type=int, default=None, help="seed of the people (None: the same as --seed)")
    g = p.add_argument_group("radar")
    g.add_argument("--carrier_ghz", type=float, default=d_radar.carrier_hz / 1e9, help="carrier frequency (GHz)")
    g.add_argument("--prf", type=float, default=d_radar.prf_hz, help="pulse repetition / slow-time sampling rate (Hz)")
    g.add_argument("--radar_distance", type=float, default=d_radar.distance_m, help="horizontal range to the walker at mid-record (m)")
    g.add_argument("--radar_height", type=float, default=d_radar.height_m, help="antenna height (m)")
    g.add_argument("--no_range_loss", action="store_true", help="drop the (R0/R)^2 amplitude factor")
    g = p.add_argument_group("recording (per sample)")
    g.add_argument("--duration", type=float, default=3.0, help="time span of each image (s)")
    g.add_argument("--snr_db", type=float, nargs=2, default=d_walk.snr_db, metavar=("LOW", "HIGH"), help="per-pulse SNR range (dB; inf inf = no noise)")
    g.add_argument("--aspect_deg", type=float, nargs=2, default=d_walk.aspect_deg, metavar=("LOW", "HIGH"), help="aspect angle range (deg; 0 = towards the radar)")
    g.add_argument("--speed_jitter", type=float, default=d_walk.speed_jitter, help="relative speed variation of a person between samples (half-width)")
    g.add_argument("--gait_jitter", type=float, default=d_walk.gait_jitter, help="relative swing-amplitude variation between samples (half-width)")
    g = p.add_argument_group("people")
    g.add_argument("--height_range", type=float, nargs=2, default=d_pv.height_m, metavar=("LOW", "HIGH"), help="body height range (m)")
    g.add_argument("--rv_range", type=float, nargs=2, default=d_pv.rv, metavar=("LOW", "HIGH"), help="preferred relative velocity v/leg length range (1/s)")
    g.add_argument("--person_variation", type=float, default=d_pv.scale, help="scale of person-to-person differences beyond height and speed (0 = none)")
    g = p.add_argument_group("spectrogram")
    g.add_argument("--window", type=float, default=d_spec.window_s, help="STFT Hann window (s)")
    g.add_argument("--overlap", type=float, default=d_spec.overlap, help="STFT overlap fraction")
    g.add_argument("--nfft", type=int, default=d_spec.nfft, help="FFT size (0 = next power of two >= 2 windows)")
    g.add_argument("--dynamic_range_db", type=float, default=d_spec.dynamic_range_db, help="dB kept below the image peak")
    g.add_argument("--velocity_band", type=float, nargs=2, default=d_spec.velocity_band_mps, metavar=("LOW", "HIGH"), help="radial velocity band shown (m/s, closing positive)")
    g.add_argument("--colormap", default=d_spec.colormap, choices=COLORMAPS, help="gray (1 channel) or jet (RGB)")
    g = p.add_argument_group("run")
    g.add_argument("--workers", type=int, default=1, help="processes")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--benchmark", type=int, default=0, metavar="N",
                   help="only time N spectrograms at --image_size (one process) and print the rate")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.benchmark:
        print(json.dumps(benchmark(args.benchmark, args.image_size, args.seed)))
        return 0
    if not args.output_dir:
        parser.error("the following arguments are required: --output_dir")
    try:
        radar = Radar(carrier_hz=args.carrier_ghz * 1e9, prf_hz=args.prf, distance_m=args.radar_distance,
                      height_m=args.radar_height, range_loss=not args.no_range_loss)
        settings = SpectrogramSettings(window_s=args.window, overlap=args.overlap, nfft=args.nfft,
                                       dynamic_range_db=args.dynamic_range_db,
                                       velocity_band_mps=tuple(args.velocity_band), image_size=args.image_size,
                                       colormap=args.colormap)
        walk_var = WalkVariation(speed_jitter=args.speed_jitter, aspect_deg=tuple(args.aspect_deg),
                                 snr_db=tuple(args.snr_db), gait_jitter=args.gait_jitter)
        person_var = PersonVariation(height_m=tuple(args.height_range), rv=tuple(args.rv_range),
                                     scale=args.person_variation)
        t0 = time.perf_counter()
        out = simulate_dataset(args.output_dir, num_users=args.num_users, samples_per_user=args.samples_per_user,
                               seed=args.seed, people_seed=args.people_seed, radar=radar, settings=settings,
                               duration_s=args.duration, walk_variation=walk_var, person_variation=person_var,
                               workers=args.workers, overwrite=args.overwrite, progress=not args.quiet,
                               command=["python -m guided_diffusion_vae.simulate", *argv])
        n = args.num_users * args.samples_per_user
        dt = time.perf_counter() - t0
        print(f"wrote {n} spectrograms of {args.num_users} people to {out} in {dt:.1f} s ({n / dt:.0f}/s)")
    except SimulationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
