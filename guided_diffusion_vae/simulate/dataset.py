"""Writing a data set: people x walks rendered in worker processes into
``user_XX/NNN.png``, ``metadata.json`` and ``samples.csv``, atomically (stage 4)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from .body import Person, PersonVariation, RV_MAX, SWING_GROUPS, Walk, WalkVariation, _require, _round_floats, draw_walk, make_people
from .radar import Radar, peak_speeds
from .spectrogram import SpectrogramSettings, encode_png, render_sample, sample_rng
from ..runtime.progress import progress as progress_bar

# --------------------------------------------------------------------------

SIMULATOR_VERSION = "1.0"  # recorded in metadata.json


@dataclass(frozen=True)
class _Job:
    people: tuple
    radar: Radar
    settings: SpectrogramSettings
    walk_variation: WalkVariation
    duration_s: float
    seed: int
    root: str
    sample_digits: int


_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job


def _init_pool_worker(job: _Job) -> None:
    """A pool worker: the job, and one BLAS thread. Each worker is one core's
    work; BLAS threads in each (one per core, inherited across fork) only
    compete with the others: 15 workers on 16 cores rendered 63 spectrograms/s
    from a Python caller, where the scripts, which set OPENBLAS_NUM_THREADS
    before numpy loads, render about 750/s. A caller from Python (a notebook
    running the quickstart) cannot set that variable in time."""
    from threadpoolctl import threadpool_limits

    _init_worker(job)
    threadpool_limits(limits=1, user_api="blas")


def _make_one(task: tuple[int, int]) -> dict:
    user, sample = task
    job = _JOB
    person = job.people[user]
    rng = sample_rng(job.seed, user, sample)
    walk = draw_walk(person, rng, job.walk_variation)
    pixels = render_sample(person, walk, job.radar, job.settings, job.duration_s, rng)
    rel = f"{person.name}/{sample:0{job.sample_digits}d}.png"
    with open(os.path.join(job.root, rel), "wb") as fh:
        fh.write(encode_png(pixels))
    return {"file": rel, "user": person.name, "label": user, "sample": sample,
            "rv_per_s": round(walk.rv, 5), "speed_mps": round(walk.rv * person.leg_length_m, 5),
            "start_phase": round(walk.start_phase, 5), "aspect_deg": round(walk.aspect_deg, 4),
            "snr_db": round(walk.snr_db, 3)}



def check_prf(people: Sequence[Person], radar: Radar, walk_variation: WalkVariation) -> float:
    """Raise unless the PRF exceeds 4 v_max / lambda for the fastest limb of any person.

    v_max is the peak scatterer speed at the person's fastest walk (rv *
    (1 + speed_jitter), swing jitter at its maximum). Returns the largest peak speed (m/s).
    """
    worst, who, seg = 0.0, "", ""
    g = 1.0 + walk_variation.gait_jitter
    for person in people:
        walk = Walk(rv=min(person.rv * (1 + walk_variation.speed_jitter), RV_MAX),
                    swing_jitter={k: g for k in SWING_GROUPS})
        speeds = peak_speeds(person, walk)
        name = max(speeds, key=speeds.get)
        if speeds[name] > worst:
            worst, who, seg = speeds[name], person.name, name
    need = 4.0 * worst / radar.wavelength_m
    _require(radar.prf_hz >= need,
             f"prf: {radar.prf_hz:g} Hz is below the Nyquist rate {need:.0f} Hz of the fastest limb "
             f"({who} {seg}, {worst:.2f} m/s at {radar.carrier_hz / 1e9:g} GHz); raise --prf")
    return worst


def _validate_walk_variation(v: WalkVariation) -> None:
    _require(0 <= v.speed_jitter < 1, f"speed_jitter: must be in [0, 1), got {v.speed_jitter}")
    _require(0 <= v.gait_jitter < 1, f"gait_jitter: must be in [0, 1), got {v.gait_jitter}")
    lo, hi = v.aspect_deg
    _require(-180 <= lo <= hi <= 180, f"aspect_deg: need -180 <= low <= high <= 180, got {lo} {hi}")
    lo, hi = v.snr_db
    _require(lo <= hi and not math.isnan(lo) and not math.isnan(hi), f"snr_db: need low <= high, got {lo} {hi}")


def _validate_person_variation(v: PersonVariation, speed_jitter: float) -> None:
    hlo, hhi = v.height_m
    _require(0.5 <= hlo <= hhi <= 2.5, f"height_range: need 0.5 <= low <= high <= 2.5 m, got {hlo} {hhi}")
    rlo, rhi = v.rv
    _require(0 < rlo <= rhi, f"rv_range: need 0 < low <= high, got {rlo} {rhi}")
    _require(rhi * (1 + speed_jitter) <= RV_MAX,
             f"rv_range: high {rhi} /s with speed_jitter {speed_jitter} exceeds the model's RV limit {RV_MAX} /s")
    _require(0 <= v.scale <= 3, f"person_variation: must be in [0, 3], got {v.scale}")


def _check_counts(num_users, samples_per_user, duration_s, workers) -> None:
    """The sizes of the run, refused before any person is drawn."""
    _require(isinstance(num_users, int) and num_users >= 1, f"num_users: must be an integer >= 1, got {num_users}")
    _require(isinstance(samples_per_user, int) and samples_per_user >= 1,
             f"samples_per_user: must be an integer >= 1, got {samples_per_user}")
    _require(duration_s > 0 and math.isfinite(duration_s), f"duration: must be > 0 s, got {duration_s}")
    _require(isinstance(workers, int) and workers >= 1, f"workers: must be >= 1, got {workers}")


def _checked_output_dir(output_dir, overwrite: bool) -> Path:
    """The absolute output folder, refused before anything is written: not a
    folder name, a file, non-empty without ``overwrite``, or no parent."""
    out = Path(output_dir).expanduser().absolute()
    _require(out.name not in ("", ".", ".."), f"output_dir: {output_dir!r} is not a folder name")
    if out.exists():
        _require(out.is_dir(), f"output_dir: {out} exists and is not a folder")
        _require(overwrite or not any(out.iterdir()), f"output_dir: {out} exists and is not empty (use --overwrite)")
    parent = out.parent
    _require(parent.is_dir(), f"output_dir: parent folder {parent} does not exist")
    return out


def _render_all(job: _Job, tasks: list, workers: int, progress: bool) -> list:
    """Every task's sample record, in task order; ``workers`` > 1 renders in a
    process pool, which is ended whatever happens."""
    bar = progress_bar(total=len(tasks), unit="img", desc="spectrograms") if progress else None
    records = []
    if workers == 1:
        _init_worker(job)
        iterator = map(_make_one, tasks)
        pool = None
    else:
        import multiprocessing as mp

        pool = mp.get_context("spawn" if sys.platform == "win32" else "fork").Pool(
            workers, initializer=_init_pool_worker, initargs=(job,))
        iterator = pool.imap(_make_one, tasks, chunksize=16)
    try:
        for rec in iterator:
            records.append(rec)
            if bar is not None:
                bar.update(1)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    return records


def _write_samples_csv(path: Path, records: list) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def _dataset_metadata(people, radar: Radar, settings: SpectrogramSettings, walk_variation: WalkVariation,
                      person_variation: PersonVariation, *, seed, people_seed, num_users, samples_per_user,
                      duration_s, peak, elapsed, command) -> dict:
    """What ``metadata.json`` holds: settings rounded, people at full precision."""
    f_lo, f_hi = (float(radar.doppler_hz(v)) for v in settings.velocity_band_mps)
    metadata = {
        "format": "microdoppler-image-folder/1",
        "generator": f"guided_diffusion_vae.simulate {SIMULATOR_VERSION}",
        "command": list(command) if command is not None else None,
        "seed": seed, "people_seed": people_seed,
        "num_users": num_users, "samples_per_user": samples_per_user,
        "label_map": {str(i): p.name for i, p in enumerate(people)},
        "radar": {**asdict(radar), "wavelength_m": radar.wavelength_m,
                  "position_m": radar.position_m.tolist(), "peak_limb_speed_mps": peak,
                  "nyquist_prf_hz": 4 * peak / radar.wavelength_m},
        "walk": {"duration_s": duration_s, **asdict(walk_variation)},
        "spectrogram": {**asdict(settings),
                        "window": "hann (periodic)",
                        "window_samples": settings.window_samples(radar.prf_hz),
                        "hop_samples": settings.hop_samples(radar.prf_hz),
                        "nfft": settings.fft_size(radar.prf_hz),
                        "doppler_band_hz": [f_lo, f_hi],
                        "rows": "Doppler, top = velocity_band_mps[1] (closing), bottom = velocity_band_mps[0]",
                        "columns": f"time, {duration_s} s left to right",
                        "pixel_values": f"dB below the image peak: 0 -> -{settings.dynamic_range_db} dB or less, 255 -> peak",
                        "png_mode": "L" if settings.colormap == "gray" else "RGB"},
        "person_variation": asdict(person_variation),
        "images": num_users * samples_per_user,
        "seconds": round(elapsed, 2),
    }
    metadata = _round_floats(metadata)
    metadata["people"] = [p.to_dict() for p in people]     # full precision: Person.from_dict round-trips
    return metadata


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out``; an old ``out`` is moved aside
    first and removed only after, so ``out`` is always whole."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "data")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def simulate_dataset(output_dir, num_users: int = 31, samples_per_user: int = 100, image_size: int = 64, seed: int = 0,
                     *, people_seed: int | None = None, radar: Radar = Radar(),
                     settings: SpectrogramSettings | None = None, duration_s: float = 3.0,
                     walk_variation: WalkVariation = WalkVariation(),
                     person_variation: PersonVariation = PersonVariation(),
                     workers: int = 1, overwrite: bool = False, progress: bool = False,
                     command: Sequence[str] | None = None) -> Path:
    """Write a class-per-person spectrogram image folder; returns its path.

    Layout: ``output_dir/user_01/000.png ...`` (zero-padded), ``metadata.json``
    (settings and every person's parameters) and ``samples.csv`` (each image's
    speed, start phase, aspect and SNR). Everything is written to a temporary
    sibling folder that replaces ``output_dir`` only when complete; an existing
    non-empty ``output_dir`` is an error unless ``overwrite``.
    ``settings.image_size`` wins over ``image_size`` when settings are given.
    """
    t_start = time.perf_counter()
    settings = settings or SpectrogramSettings(image_size=image_size)
    _check_counts(num_users, samples_per_user, duration_s, workers)
    radar.validate()
    _validate_walk_variation(walk_variation)
    _validate_person_variation(person_variation, walk_variation.speed_jitter)
    people_seed = seed if people_seed is None else people_seed
    people = make_people(num_users, people_seed, person_variation)
    peak = check_prf(people, radar, walk_variation)
    settings.validate(radar)
    _require(settings.window_s < duration_s, f"window: {settings.window_s} s must be shorter than duration {duration_s} s")
    out = _checked_output_dir(output_dir, overwrite)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for person in people:
            (tmp / person.name).mkdir()
        digits = max(3, len(str(samples_per_user - 1)))
        job = _Job(tuple(people), radar, settings, walk_variation, duration_s, seed, str(tmp), digits)
        tasks = [(u, j) for u in range(num_users) for j in range(samples_per_user)]
        records = _render_all(job, tasks, workers, progress)
        elapsed = time.perf_counter() - t_start

        _write_samples_csv(tmp / "samples.csv", records)
        metadata = _dataset_metadata(people, radar, settings, walk_variation, person_variation,
                                     seed=seed, people_seed=people_seed, num_users=num_users,
                                     samples_per_user=samples_per_user, duration_s=duration_s, peak=peak,
                                     elapsed=elapsed, command=command)
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=1) + "\n")
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def benchmark(n: int = 300, image_size: int = 64, seed: int = 0) -> dict:
    """Throughput of the full per-image path (walk draw, returns, spectrogram, PNG encode).

    Renders ``n`` images of the default 31 people with default settings
    (nothing is written) and returns spectrograms per second of wall and of
    process CPU time. Run it with OMP/OPENBLAS threads = 1 for a one-core figure.
    """
    people = make_people(31, seed)
    radar, settings, variation = Radar(), SpectrogramSettings(image_size=image_size), WalkVariation()

    def one(j: int) -> None:
        user = j % len(people)
        rng = sample_rng(seed, user, j)
        walk = draw_walk(people[user], rng, variation)
        encode_png(render_sample(people[user], walk, radar, settings, 3.0, rng))

    for j in range(3):
        one(j)
    wall, cpu = time.perf_counter(), time.process_time()
    for j in range(n):
        one(j)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images": n, "image_size": image_size, "per_s_wall": round(n / wall, 1), "per_s_cpu": round(n / cpu, 1),
            "threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}


# --------------------------------------------------------------------------
