#!/usr/bin/env python3
"""Radar micro-Doppler spectrograms of walking people, one class per person.

The simulator chains four stages, each usable on its own:

1. **Gait** (:func:`gait_timing`, :func:`joint_angles`, :func:`body_kinematics`):
   the Boulic-Thalmann global walking model (R. Boulic, N. Magnenat-Thalmann,
   D. Thalmann, *The Visual Computer* 6, 1990) as used by V. C. Chen's walking
   human radar model. Body height ``H`` (m) and walking speed ``v`` (m/s) give
   the leg length ``Ht = (0.245 + 0.246) H`` (m), the relative velocity
   ``RV = v / Ht`` (1/s), the stride ``RLc * Ht = 1.346 sqrt(RV) Ht`` (m) and
   the cycle duration ``Dc = 1.346 / sqrt(RV)`` (s). The model's translations
   are given in units of ``Ht``; they are converted to metres here, and the
   body advances ``v * t`` metres (not ``RLc`` "metres" per cycle, a unit slip
   of two public codes). Forward kinematics gives every joint in metres.
2. **Radar returns** (:class:`Radar`, :func:`simulate_returns`): 16 body segments
   as prolate spheroids with the aspect-dependent physical-optics RCS, summed
   coherently with phase ``exp(-j 4 pi R / lambda)``, optional ``(R0/R)^2``
   amplitude (two-way spreading), complex white noise at a chosen SNR.
3. **Spectrogram** (:class:`SpectrogramSettings`, :func:`stft`,
   :func:`spectrogram`): STFT, power in dB, a fixed dynamic range below the
   image peak, a fixed Doppler band (given in m/s of radial velocity, so images
   from different carriers are comparable) and an energy-preserving (area)
   resampling to ``image_size x image_size``. Rows run from the highest Doppler
   (top) to the lowest (bottom); columns are time.
4. **People and data set** (:class:`Person`, :func:`make_people`,
   :func:`draw_walk`, :func:`simulate_dataset`): each class is a person with
   fixed body and gait parameters; each sample varies the speed a little, the
   start phase, the aspect angle, the SNR and the swing amplitudes. Output:
   ``user_01/000.png ...``, ``metadata.json`` and ``samples.csv``, written to a
   temporary folder and renamed into place only when complete.

Coordinates: world frame in metres, ``z`` up, the radar at ``(0, 0,
radar.height_m)``. The walker's path passes the horizontal point
``(radar.distance_m, 0)`` at the middle of the record. Body frame: ``x``
forward (walking direction), ``y`` to the walker's left, ``z`` up, origin at
the spine base. Joint angles are in degrees: flexion positive (thigh, upper
arm forward; knee bends the shank back; elbow bends the forearm forward;
ankle positive = toes up). Arrays of points are component-first: ``(3, ...)``.

Command line (``python datasets/microdoppler.py --help`` lists every option)::

    python datasets/microdoppler.py --output_dir data/md31 --num_users 31 \\
        --samples_per_user 200 --image_size 64 --seed 0

Determinism: person ``i`` depends only on ``(people_seed, i)`` and sample
``j`` of person ``i`` only on ``(seed, i, j)``, so the same arguments give
byte-identical PNGs, whatever ``--workers`` is, and enlarging a data set keeps
its existing images.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # The CLI parallelises over processes (--workers); BLAS threads on these
    # small matrices only compete with them.
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import argparse
import csv
import io
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import scipy.fft

__version__ = "1.0"

SPEED_OF_LIGHT = 299_792_458.0  # m/s

try:  # Share the project's "user error" type when the package is importable.
    from guided_diffusion_vae.errors import UserError as _UserErrorBase
except Exception:  # pragma: no cover - standalone use of this file
    class _UserErrorBase(Exception):
        """Stand-in for guided_diffusion_vae.errors.UserError."""


class SimulationError(_UserErrorBase, ValueError):
    """A bad argument or setting; the message is one line naming the culprit."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SimulationError(message)


# --------------------------------------------------------------------------
# Body model tables
# --------------------------------------------------------------------------

#: Segment lengths as fractions of body height H (Boulic-Thalmann / Chen).
#: ``shoulder`` and ``hip`` are HALF widths (neck to shoulder joint, spine
#: base to hip joint).
SEGMENT_LENGTH_RATIOS: dict[str, float] = {
    "head": 0.130,
    "shoulder": 0.1295,
    "torso": 0.288,
    "hip": 0.0955,
    "thigh": 0.245,
    "shank": 0.246,
    "foot": 0.143,
    "upper_arm": 0.188,
    "forearm": 0.152,
}

#: Equatorial semi-axes a = b (m) of each segment's spheroid; the polar
#: semi-axis c is half the segment length.
SCATTERER_RADII_M: dict[str, float] = {
    "head": 0.10,
    "torso": 0.15,
    "shoulder": 0.06,
    "upper_arm": 0.06,
    "forearm": 0.05,
    "hip": 0.07,
    "thigh": 0.07,
    "shank": 0.06,
    "foot": 0.05,
}

#: The 16 scattering segments, in the order of every per-segment array.
SEGMENTS: tuple[str, ...] = (
    "head", "torso",
    "shoulder_l", "shoulder_r", "upper_arm_l", "upper_arm_r", "forearm_l", "forearm_r",
    "hip_l", "hip_r", "thigh_l", "thigh_r", "shank_l", "shank_r", "foot_l", "foot_r",
)

#: Segment -> (start joint, end joint) of its axis; the scatterer sits at the midpoint.
SEGMENT_JOINTS: dict[str, tuple[str, str]] = {
    "head": ("neck", "head_top"),
    "torso": ("base", "neck"),
    "shoulder_l": ("neck", "shoulder_l"), "shoulder_r": ("neck", "shoulder_r"),
    "upper_arm_l": ("shoulder_l", "elbow_l"), "upper_arm_r": ("shoulder_r", "elbow_r"),
    "forearm_l": ("elbow_l", "hand_l"), "forearm_r": ("elbow_r", "hand_r"),
    "hip_l": ("base", "hip_l"), "hip_r": ("base", "hip_r"),
    "thigh_l": ("hip_l", "knee_l"), "thigh_r": ("hip_r", "knee_r"),
    "shank_l": ("knee_l", "ankle_l"), "shank_r": ("knee_r", "ankle_r"),
    "foot_l": ("ankle_l", "toe_l"), "foot_r": ("ankle_r", "toe_r"),
}


def segment_kind(segment: str) -> str:
    """``"thigh_l"`` -> ``"thigh"`` (the key into the length and radius tables)."""
    return segment[:-2] if segment.endswith(("_l", "_r")) else segment


#: Joint-angle groups that a person scales (swing amplitude factors).
SWING_GROUPS: tuple[str, ...] = ("hip", "knee", "ankle", "shoulder", "elbow", "trunk")

#: Number of control points (phase-offset slots) of each PCHIP joint curve.
CURVE_SLOTS: dict[str, int] = {"hip": 2, "knee": 4, "ankle": 5, "elbow": 3, "thorax": 4}

#: The model is defined for RV in (0, 3] (1/s).
RV_MAX = 3.0


# --------------------------------------------------------------------------
# Stage 1: gait timing and joint angles
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class GaitTiming:
    """Spatio-temporal gait parameters of the Boulic-Thalmann model, in SI units.

    Attributes: ``leg_length_m`` Ht (m); ``speed_mps`` v (m/s); ``rv`` relative
    velocity v/Ht (1/s); ``relative_cycle_length`` RLc (in units of Ht);
    ``stride_m`` one full gait cycle (two steps), RLc*Ht (m); ``cycle_s`` Dc
    (s); ``support_s`` single-foot support Ds = 0.752 Dc - 0.143 (s);
    ``support_fraction`` Ds/Dc; ``step_s`` Dc/2 (s).
    """

    leg_length_m: float
    speed_mps: float
    rv: float
    relative_cycle_length: float
    stride_m: float
    cycle_s: float
    support_s: float
    support_fraction: float

    @property
    def step_s(self) -> float:
        return self.cycle_s / 2.0

    @property
    def cadence_steps_per_min(self) -> float:
        return 120.0 / self.cycle_s


def gait_timing(height_m: float | None = None, speed_mps: float | None = None, *,
                leg_length_m: float | None = None, rv: float | None = None,
                stride_factor: float = 1.0) -> GaitTiming:
    """Gait timing from body size and speed (SI units throughout).

    Give ``height_m`` (H, m) or ``leg_length_m`` (Ht, m), and ``speed_mps``
    (m/s) or ``rv`` (1/s). ``stride_factor`` scales the relative cycle length
    (1 = the model's population average). Example: H = 1.8 m, v = 1.4 m/s gives
    Ht = 0.884 m, RV = 1.584 /s, stride 1.50 m, Dc = 1.07 s.
    """
    if leg_length_m is None:
        _require(height_m is not None and height_m > 0, f"height_m: must be > 0, got {height_m}")
        leg_length_m = (SEGMENT_LENGTH_RATIOS["thigh"] + SEGMENT_LENGTH_RATIOS["shank"]) * height_m
    _require(leg_length_m > 0, f"leg_length_m: must be > 0, got {leg_length_m}")
    if rv is None:
        _require(speed_mps is not None, "speed_mps or rv must be given")
        rv = speed_mps / leg_length_m
    _require(0 < rv <= RV_MAX, f"relative velocity: RV = v/Ht must be in (0, {RV_MAX}] 1/s, got {rv:.3g}")
    _require(stride_factor > 0, f"stride_factor: must be > 0, got {stride_factor}")
    speed = rv * leg_length_m
    rlc = 1.346 * stride_factor * math.sqrt(rv)
    cycle = rlc / rv                      # = RLc * Ht / v, seconds
    support = 0.752 * cycle - 0.143       # seconds (Boulic's regression in s)
    return GaitTiming(leg_length_m=leg_length_m, speed_mps=speed, rv=rv,
                      relative_cycle_length=rlc, stride_m=rlc * leg_length_m,
                      cycle_s=cycle, support_s=support, support_fraction=support / cycle)


def gait_regime(rv: float) -> str:
    """Boulic's speed regime: 'a' (RV < 0.5), 'b' (0.5-1.3), 'c' (1.3-3), RV in 1/s."""
    _require(0 < rv <= RV_MAX, f"relative velocity: RV must be in (0, {RV_MAX}] 1/s, got {rv:.3g}")
    return "a" if rv < 0.5 else ("b" if rv < 1.3 else "c")


def _control_points(curve: str, rv: float, dsmod: float) -> list[tuple[float, float, int]]:
    """Control points ``(phase, degrees, offset slot)`` of one PCHIP joint curve.

    Values follow Boulic's appendices as coded by Chen; regime c drifts
    linearly with ``k' = (RV - 1.3) / 1.7``. Points that coincide modulo one
    cycle (hip in regimes a and b) are given once. The thorax curve is in the
    model's sign (the caller negates it into a right-handed yaw).
    """
    reg = gait_regime(rv)
    kc = (rv - 1.3) / 1.7
    if curve == "hip":
        if reg == "a":
            return [(-0.1, 50 * rv, 0), (0.5, -30 * rv, 1)]
        if reg == "b":
            return [(-0.1, 25.0, 0), (0.5, -15.0, 1)]
        return [(0.2 * kc - 0.1, 25 + 5 * kc, 0), (0.5, -15.0, 1), (0.9, 25 + 6 * kc, 0)]
    if curve == "knee":
        if reg == "a":
            return [(0.17, 3.0, 0), (0.4, 3.0, 1), (0.75, 140 * rv, 2), (1.0, 3.0, 3)]
        if reg == "b":
            return [(0.17, 3.0, 0), (0.4, 3.0, 1), (0.75, 70.0, 2), (1.0, 3.0, 3)]
        return [(0.17 - 0.05 * kc, 3 + 22 * kc, 0), (0.4, 3.0, 1),
                (0.75 - 0.05 * kc, 70 - 5 * kc, 2), (1.0 - 0.03 * kc, 3 + 3 * kc, 3)]
    if curve == "ankle":
        if reg == "a":
            ys = (-3.0, -30 * rv - 3, 22 * rv - 3, -34 * rv - 3, -3.0)
            xs = (0.0, 0.08, 0.5, dsmod, 0.85)
        elif reg == "b":
            ys = (-3.0, -18.0, 8.0, -20.0, -3.0)
            xs = (0.0, 0.08, 0.5, dsmod, 0.85)
        else:
            ys = (-3 + 5 * kc, -18 + 4 * kc, 8 - 3 * kc, -20 - 8 * kc, -3 + 5 * kc)
            xs = (0.0, 0.08, 0.5 - 0.1 * kc, dsmod, 0.85)
        return [(x, y, i) for i, (x, y) in enumerate(zip(xs, ys))]
    if curve == "elbow":
        if reg == "a":
            return [(0.05, 6 * rv + 3, 0), (0.5, 34 * rv + 3, 1), (0.9, 10 * rv + 3, 2)]
        if reg == "b":
            kb = (rv - 0.5) / 0.8
            return [(0.05, 6 + 8 * kb, 0), (0.5 + 0.01 * kb, 20 + 24 * kb, 1), (0.9, 8 + 9 * kb, 2)]
        # Chen's code writes (rv - .13) in the last value, which breaks continuity
        # with regime b at RV = 1.3; (rv - 1.3) is used here.
        return [(0.05, 14 - 6 * kc, 0), (0.51 + 0.04 * kc, 44 + 26 * kc, 1), (0.9 - 0.1 * kc, 17 - 6 * kc, 2)]
    if curve == "thorax":
        return [(0.1, 4 * rv / 3, 0), (0.4, -1.5 * rv, 1), (0.6, -4 * rv / 3, 2), (0.9, 1.5 * rv, 3)]
    raise KeyError(curve)


def _pchip_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Shape-preserving (Fritsch-Carlson / MATLAB ``pchip``) knot derivatives, interior points."""
    h = np.diff(x)
    delta = np.diff(y) / h
    d = np.zeros_like(y)
    w1 = 2 * h[1:] + h[:-1]
    w2 = h[1:] + 2 * h[:-1]
    same = (delta[:-1] * delta[1:]) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        harmonic = (w1 + w2) / (w1 / delta[:-1] + w2 / delta[1:])
    d[1:-1] = np.where(same, harmonic, 0.0)
    return d


def _periodic_pchip(points: Sequence[tuple[float, float]], phase: np.ndarray) -> np.ndarray:
    """Evaluate the 1-periodic shape-preserving cubic through ``points`` at ``phase`` (cycles).

    The control points are tiled over three periods so that every knot of
    the middle period gets interior (periodic) slopes, as in Chen's code.
    """
    xs = np.array([p[0] for p in points], dtype=float) % 1.0
    ys = np.array([p[1] for p in points], dtype=float)
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    _require(bool(np.all(np.diff(xs) > 1e-6)) and xs[-1] - xs[0] < 1 - 1e-6,
             "gait control points collide (phase offsets too large)")
    x = np.concatenate([xs - 1.0, xs, xs + 1.0])
    y = np.concatenate([ys, ys, ys])
    d = _pchip_slopes(x, y)
    t = np.mod(phase, 1.0)
    k = np.clip(np.searchsorted(x, t, side="right") - 1, 0, x.size - 2)
    h = x[k + 1] - x[k]
    s = (t - x[k]) / h
    s2, s3 = s * s, s * s * s
    return ((2 * s3 - 3 * s2 + 1) * y[k] + (s3 - 2 * s2 + s) * h * d[k]
            + (-2 * s3 + 3 * s2) * y[k + 1] + (s3 - s2) * h * d[k + 1])


def _roll_curve(phase: np.ndarray, amplitude: float) -> np.ndarray:
    """Pelvis list (roll) in degrees: Boulic's piecewise cosines, breaks at 0.15, 0.5, 0.65."""
    t = np.mod(phase, 1.0)
    a = amplitude
    return np.select(
        [t < 0.15, t < 0.5, t < 0.65],
        [-a + a * np.cos(2 * np.pi * 10 * t / 3),
         -a - a * np.cos(2 * np.pi * 10 * (t - 0.15) / 7),
         a - a * np.cos(2 * np.pi * 10 * (t - 0.5) / 3)],
        a + a * np.cos(2 * np.pi * 10 * (t - 0.65) / 7),
    )


# --------------------------------------------------------------------------
# People and per-sample walks
# --------------------------------------------------------------------------

def _unit_dict(keys: Iterable[str]) -> dict[str, float]:
    return {k: 1.0 for k in keys}


@dataclass(frozen=True)
class Person:
    """A walker's fixed body and gait parameters (one class of the data set).

    Attributes:
        name: class folder name, e.g. ``"user_01"``.
        height_m: body height H (m).
        rv: preferred relative velocity v/Ht (1/s); ``speed_mps`` follows.
        stride_factor: scales the relative cycle length 1.346 sqrt(RV) (and the
            hip swing with it): a long-striding person walks the same speed at
            a lower cadence.
        segment_scale: per segment kind (``SEGMENT_LENGTH_RATIOS`` keys), a
            factor on the length ratio.
        radius_scale: per segment kind, a factor on the scatterer radius.
        swing: per group of ``SWING_GROUPS``, a factor on the joint-angle
            excursion (``trunk`` scales pelvis and thorax rotations).
        leg_asymmetry, arm_asymmetry: relative amplitude difference left minus
            right (0.1 = left swings 10 % more than right).
        timing_asymmetry: the left side's phase lag beyond half a cycle (cycles).
        phase_offsets: per PCHIP curve (``CURVE_SLOTS``), a phase offset of each
            control point (cycles).
    """

    name: str = "user_01"
    height_m: float = 1.75
    rv: float = 1.6
    stride_factor: float = 1.0
    segment_scale: Mapping[str, float] = field(default_factory=lambda: _unit_dict(SEGMENT_LENGTH_RATIOS))
    radius_scale: Mapping[str, float] = field(default_factory=lambda: _unit_dict(SCATTERER_RADII_M))
    swing: Mapping[str, float] = field(default_factory=lambda: _unit_dict(SWING_GROUPS))
    leg_asymmetry: float = 0.0
    arm_asymmetry: float = 0.0
    timing_asymmetry: float = 0.0
    phase_offsets: Mapping[str, Sequence[float]] = field(
        default_factory=lambda: {k: (0.0,) * n for k, n in CURVE_SLOTS.items()})

    @property
    def segment_lengths_m(self) -> dict[str, float]:
        """Segment kind -> length (m); shoulder and hip are half widths."""
        return {k: r * self.height_m * float(self.segment_scale.get(k, 1.0))
                for k, r in SEGMENT_LENGTH_RATIOS.items()}

    @property
    def leg_length_m(self) -> float:
        """Ht = thigh + shank (m)."""
        lengths = self.segment_lengths_m
        return lengths["thigh"] + lengths["shank"]

    @property
    def speed_mps(self) -> float:
        """Preferred walking speed v = RV * Ht (m/s)."""
        return self.rv * self.leg_length_m

    def timing(self, rv: float | None = None) -> GaitTiming:
        """Gait timing at relative velocity ``rv`` (1/s; default the preferred one)."""
        return gait_timing(leg_length_m=self.leg_length_m, rv=self.rv if rv is None else rv,
                           stride_factor=self.stride_factor)

    def to_dict(self) -> dict:
        """JSON-ready parameters plus derived values (leg length, speed, cycle, stride)."""
        out = asdict(self)
        out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in out.items()}
        out["phase_offsets"] = {k: [float(x) for x in v] for k, v in self.phase_offsets.items()}
        t = self.timing()
        out["derived"] = _round_floats({
            "leg_length_m": self.leg_length_m, "speed_mps": self.speed_mps,
            "cycle_s": t.cycle_s, "stride_m": t.stride_m, "support_fraction": t.support_fraction,
            "segment_lengths_m": self.segment_lengths_m,
        })
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "Person":
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if "phase_offsets" in kwargs:
            kwargs["phase_offsets"] = {k: tuple(v) for k, v in kwargs["phase_offsets"].items()}
        return cls(**kwargs)


@dataclass(frozen=True)
class PersonVariation:
    """Ranges from which :func:`make_people` draws people (uniform draws).

    ``height_m`` (m) and ``rv`` (1/s) are (low, high); the others are
    half-widths of relative deviations (``timing_asymmetry`` and
    ``phase_offset`` in cycles), as suggested in the project's physics
    reference. ``scale`` multiplies all half-widths at once: 0 gives people
    that differ only in height and speed; 1 the full suggested spreads, which
    a small CNN tells apart almost perfectly (98 %); the default 0.4 was tuned
    for a realistic difficulty (see datasets/README.md).
    """

    height_m: tuple[float, float] = (1.50, 1.95)
    rv: tuple[float, float] = (1.2, 2.0)
    stride: float = 0.06
    segment: float = 0.05
    radius: float = 0.20
    swing: float = 0.15
    arm_swing: float = 0.30
    leg_asymmetry: float = 0.10
    arm_asymmetry: float = 0.20
    timing_asymmetry: float = 0.02
    phase_offset: float = 0.02
    scale: float = 0.4


def make_person(rng: np.random.Generator, name: str, variation: PersonVariation = PersonVariation()) -> Person:
    """Draw one person's parameters from ``variation`` with generator ``rng``."""
    s = variation.scale

    def dev(half_width: float, n: int | None = None):
        return rng.uniform(-half_width * s, half_width * s, n)

    height = float(rng.uniform(*variation.height_m))
    rv = float(rng.uniform(*variation.rv))
    stride = 1.0 + float(dev(variation.stride))
    seg = {k: 1.0 + float(dev(variation.segment)) for k in SEGMENT_LENGTH_RATIOS}
    rad = {k: 1.0 + float(dev(variation.radius)) for k in SCATTERER_RADII_M}
    swing = {k: 1.0 + float(dev(variation.arm_swing if k == "shoulder" else variation.swing))
             for k in SWING_GROUPS}
    leg_asym = float(dev(variation.leg_asymmetry))
    arm_asym = float(dev(variation.arm_asymmetry))
    timing_asym = float(dev(variation.timing_asymmetry))
    offsets = {k: tuple(float(x) for x in dev(variation.phase_offset, n)) for k, n in CURVE_SLOTS.items()}
    return Person(name=name, height_m=height, rv=rv, stride_factor=stride, segment_scale=seg,
                  radius_scale=rad, swing=swing, leg_asymmetry=leg_asym, arm_asymmetry=arm_asym,
                  timing_asymmetry=timing_asym, phase_offsets=offsets)


def user_name(index: int, num_users: int) -> str:
    """Zero-padded class folder name: ``user_01`` ... (index counts from 0)."""
    return f"user_{index + 1:0{max(2, len(str(num_users)))}d}"


def make_people(num_users: int, seed: int = 0, variation: PersonVariation = PersonVariation()) -> list[Person]:
    """The data set's people; person ``i`` depends only on ``(seed, i)``."""
    _require(num_users >= 1, f"num_users: must be >= 1, got {num_users}")
    return [make_person(np.random.default_rng([seed, 0, i]), user_name(i, num_users), variation)
            for i in range(num_users)]


@dataclass(frozen=True)
class Walk:
    """One recording's random conditions.

    ``rv`` relative velocity of this walk (1/s); ``start_phase`` gait phase at
    t = 0 (cycles; phase 0 = right heel strike); ``aspect_deg`` angle between
    the walking direction and the line from the walker to the radar (0 =
    straight at the radar, 90 = crossing with the radar on the walker's left,
    180 = straight away); ``snr_db`` per-pulse signal-to-noise ratio (inf = no
    noise); ``swing_jitter`` per-recording factors on the person's swing
    amplitudes (``SWING_GROUPS`` keys).
    """

    rv: float
    start_phase: float = 0.0
    aspect_deg: float = 0.0
    snr_db: float = math.inf
    swing_jitter: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class WalkVariation:
    """Per-sample variation: relative speed jitter (half-width), aspect and SNR
    ranges (degrees, dB; uniform), relative swing-amplitude jitter (half-width)."""

    speed_jitter: float = 0.10
    aspect_deg: tuple[float, float] = (-30.0, 30.0)
    snr_db: tuple[float, float] = (10.0, 30.0)
    gait_jitter: float = 0.10


def draw_walk(person: Person, rng: np.random.Generator, variation: WalkVariation = WalkVariation()) -> Walk:
    """Draw one recording's conditions for ``person``."""
    rv = person.rv * (1.0 + rng.uniform(-variation.speed_jitter, variation.speed_jitter))
    phase = rng.uniform(0.0, 1.0)
    aspect = rng.uniform(*variation.aspect_deg)
    lo, hi = variation.snr_db
    snr = lo if lo == hi else rng.uniform(lo, hi)
    g = variation.gait_jitter
    jitter = {k: 1.0 + float(rng.uniform(-g, g)) for k in SWING_GROUPS}
    return Walk(rv=float(min(rv, RV_MAX)), start_phase=float(phase), aspect_deg=float(aspect),
                snr_db=float(snr), swing_jitter=jitter)


def joint_angles(person: Person, walk: Walk, phase: np.ndarray, timing: GaitTiming | None = None) -> dict[str, np.ndarray]:
    """Joint and trunk angles over time, in degrees, and translations in metres.

    ``phase`` (T,) is the right side's gait phase in cycles (0 = right heel
    strike). Returns ``hip``, ``knee``, ``ankle``, ``shoulder``, ``elbow`` as
    (2, T) arrays (row 0 left, row 1 right; the left side runs half a cycle
    plus ``timing_asymmetry`` behind), and (T,) arrays ``pelvis_yaw``,
    ``pelvis_roll``, ``trunk_lean`` (forward positive), ``thorax_yaw``
    (right-handed about z, degrees), ``forward_m``, ``lateral_m`` and
    ``vertical_m`` (spine-base oscillations in metres).
    """
    timing = timing or person.timing(walk.rv)
    rv, dsmod, ht = timing.rv, timing.support_fraction, timing.leg_length_m
    reg = gait_regime(rv)
    phase = np.asarray(phase, dtype=float)
    sides = np.stack([phase + 0.5 + person.timing_asymmetry, phase])          # (2, T): left, right
    amp = {k: float(person.swing.get(k, 1.0)) * float(walk.swing_jitter.get(k, 1.0)) for k in SWING_GROUPS}
    amp["hip"] *= person.stride_factor
    leg_lr = np.array([1 + person.leg_asymmetry / 2, 1 - person.leg_asymmetry / 2])[:, None]
    arm_lr = np.array([1 + person.arm_asymmetry / 2, 1 - person.arm_asymmetry / 2])[:, None]

    out: dict[str, np.ndarray] = {}
    for curve, anchor, lr in (("hip", "mean", leg_lr), ("knee", "min", leg_lr),
                              ("ankle", "first", leg_lr), ("elbow", "min", arm_lr)):
        pts = _control_points(curve, rv, dsmod)
        offs = person.phase_offsets.get(curve, ())
        pts = [(x + (offs[slot] if slot < len(offs) else 0.0), y) for x, y, slot in pts]
        ys = np.array([p[1] for p in pts])
        ref = {"mean": ys.mean(), "min": ys.min(), "first": ys[0]}[anchor]
        base = _periodic_pchip(pts, sides)                                     # (2, T)
        # PCHIP commutes with y -> ref + s (y - ref), so scaling the curve is exact.
        out[curve] = ref + amp[curve] * lr * (base - ref)

    arm = 9.88 * rv * amp["shoulder"] * arm_lr                                 # swing amplitude A, deg
    out["shoulder"] = 3.0 - arm / 2 - arm * np.cos(2 * np.pi * sides)

    trunk = amp["trunk"]
    a1 = 8 * rv * (1 - rv) if reg == "a" else 2.0
    out["trunk_lean"] = trunk * (a1 - a1 * np.sin(2 * np.pi * (2 * phase - 0.1)))
    out["pelvis_yaw"] = trunk * 4 * rv * np.cos(2 * np.pi * phase)
    out["pelvis_roll"] = trunk * _roll_curve(phase, 1.66 * rv)
    thorax = [(x + person.phase_offsets.get("thorax", (0,) * 4)[slot], y)
              for x, y, slot in _control_points("thorax", rv, dsmod)]
    out["thorax_yaw"] = -trunk * _periodic_pchip(thorax, phase)

    # Spine-base oscillations; the model gives them in units of Ht.
    av = 0.015 * rv
    al = 0.128 * rv * (1 - rv) if reg == "a" else 0.032
    aa = 0.084 * rv * (1 - rv) if reg == "a" else 0.021
    out["vertical_m"] = ht * (-av + av * np.sin(2 * np.pi * (2 * phase - 0.35)))
    out["lateral_m"] = ht * (-al * np.sin(2 * np.pi * (phase - 0.1)))
    out["forward_m"] = ht * (-aa * np.sin(2 * np.pi * (2 * phase + 2 * (0.625 - dsmod))))
    return out


# --------------------------------------------------------------------------
# Forward kinematics
# --------------------------------------------------------------------------

def _rot_z(p: np.ndarray, ang: np.ndarray) -> np.ndarray:
    """Rotate component-first points ``p`` (3, ...) about +z by ``ang`` (rad, broadcast)."""
    c, s = np.cos(ang), np.sin(ang)
    return np.stack([c * p[0] - s * p[1], s * p[0] + c * p[1], np.broadcast_to(p[2], np.broadcast(p[0], c).shape)])


def _rot_x(p: np.ndarray, ang: np.ndarray) -> np.ndarray:
    c, s = np.cos(ang), np.sin(ang)
    return np.stack([np.broadcast_to(p[0], np.broadcast(p[1], c).shape), c * p[1] - s * p[2], s * p[1] + c * p[2]])


def _rot_y(p: np.ndarray, ang: np.ndarray) -> np.ndarray:
    c, s = np.cos(ang), np.sin(ang)
    return np.stack([c * p[0] + s * p[2], np.broadcast_to(p[1], np.broadcast(p[0], c).shape), -s * p[0] + c * p[2]])


def _sagittal(length: float, ang: np.ndarray, down: bool = True) -> np.ndarray:
    """Vector of ``length`` in the x-z plane: hanging (``down``) or forward, rotated forward by ``ang`` (rad)."""
    if down:
        return length * np.stack([np.sin(ang), np.zeros_like(ang), -np.cos(ang)])
    return length * np.stack([np.cos(ang), np.zeros_like(ang), np.sin(ang)])


@dataclass
class Kinematics:
    """Joint positions of one walk.

    ``joints[name]`` is (3, T) in world metres for ``base`` (spine base),
    ``neck``, ``head_top``, and ``shoulder``, ``elbow``, ``hand``, ``hip``,
    ``knee``, ``ankle``, ``toe`` with suffix ``_l``/``_r``. ``times_s`` (T,),
    ``phase`` (T,) right-side gait phase (cycles), ``heading`` (3,) unit
    walking direction, ``timing`` the walk's :class:`GaitTiming`, ``angles``
    the :func:`joint_angles` output.
    """

    times_s: np.ndarray
    phase: np.ndarray
    joints: dict[str, np.ndarray]
    heading: np.ndarray
    timing: GaitTiming
    angles: dict[str, np.ndarray]


def body_kinematics(person: Person, walk: Walk, times_s: np.ndarray, *, distance_m: float = 6.0,
                    t_mid_s: float | None = None) -> Kinematics:
    """Forward kinematics of ``person`` on ``walk`` at ``times_s`` (T,) seconds.

    The spine base moves at ``timing.speed_mps`` along the heading set by
    ``walk.aspect_deg`` and passes the horizontal point ``(distance_m, 0)`` at
    ``t_mid_s`` (default: the middle of ``times_s``); the lowest foot point
    over the record touches z = 0.
    """
    times = np.asarray(times_s, dtype=float)
    timing = person.timing(walk.rv)
    if t_mid_s is None:
        t_mid_s = 0.5 * (times[0] + times[-1]) if times.size else 0.0
    phase = walk.start_phase + times / timing.cycle_s
    ang = joint_angles(person, walk, phase, timing)
    rad = np.deg2rad
    L = person.segment_lengths_m
    side = np.array([1.0, -1.0])[:, None]                                      # left +y, right -y
    zeros = np.zeros((2, times.size))

    # Legs, in the pelvis frame (origin at the spine base), sides stacked on axis 1.
    hip0 = np.stack([zeros, side * L["hip"] + zeros, zeros])                  # (3, 2, T)
    h, k, a = rad(ang["hip"]), rad(ang["knee"]), rad(ang["ankle"])
    knee = hip0 + _sagittal(L["thigh"], h)
    ankle = knee + _sagittal(L["shank"], h - k)
    toe = ankle + _sagittal(L["foot"], h - k + a, down=False)
    yaw_p, roll_p = rad(ang["pelvis_yaw"]), rad(ang["pelvis_roll"])
    legs = _rot_z(_rot_x(np.stack([hip0, knee, ankle, toe]).transpose(1, 0, 2, 3), roll_p), yaw_p)

    # Upper body, in the thorax frame, then leaned forward and twisted.
    f, e = rad(ang["shoulder"]), rad(ang["elbow"])
    shoulder0 = np.stack([zeros, side * L["shoulder"] + zeros, zeros + L["torso"]])
    elbow = shoulder0 + _sagittal(L["upper_arm"], f)
    hand = elbow + _sagittal(L["forearm"], f + e)
    arms = np.stack([shoulder0, elbow, hand]).transpose(1, 0, 2, 3)           # (3, 3, 2, T)
    neck0 = np.zeros((3, times.size))
    neck0[2] = L["torso"]
    head0 = neck0.copy()
    head0[2] += L["head"]
    spine = np.stack([neck0, head0], axis=1)                                  # (3, 2, T): neck, head top
    lean, yaw_t = rad(ang["trunk_lean"]), rad(ang["thorax_yaw"])
    arms = _rot_z(_rot_y(arms, lean), yaw_t)
    spine = _rot_z(_rot_y(spine, lean), yaw_t)

    # Spine-base path: steady forward motion plus the model's oscillations.
    base = np.stack([timing.speed_mps * (times - t_mid_s) + ang["forward_m"], ang["lateral_m"], ang["vertical_m"]])
    ground = -float((legs[2, 2:] + base[2]).min())                           # lowest ankle / toe -> z = 0

    aspect = math.radians(walk.aspect_deg)
    heading = np.array([-math.cos(aspect), math.sin(aspect), 0.0])
    left = np.array([-heading[1], heading[0], 0.0])
    origin = np.array([distance_m, 0.0, ground])

    def world(p: np.ndarray) -> np.ndarray:
        q = p + base.reshape((3,) + (1,) * (p.ndim - 2) + (-1,))
        return (origin.reshape((3,) + (1,) * (q.ndim - 1)) + heading.reshape((3,) + (1,) * (q.ndim - 1)) * q[0]
                + left.reshape((3,) + (1,) * (q.ndim - 1)) * q[1]
                + np.array([0, 0, 1.0]).reshape((3,) + (1,) * (q.ndim - 1)) * q[2])

    legs, arms, spine = world(legs), world(arms), world(spine)
    joints = {"base": world(np.zeros((3, times.size))), "neck": spine[:, 0], "head_top": spine[:, 1]}
    for i, name in enumerate(("hip", "knee", "ankle", "toe")):
        joints[f"{name}_l"], joints[f"{name}_r"] = legs[:, i, 0], legs[:, i, 1]
    for i, name in enumerate(("shoulder", "elbow", "hand")):
        joints[f"{name}_l"], joints[f"{name}_r"] = arms[:, i, 0], arms[:, i, 1]
    return Kinematics(times_s=times, phase=phase, joints=joints, heading=heading, timing=timing, angles=ang)


def segment_geometry(person: Person, kin: Kinematics, segments: Sequence[str] = SEGMENTS):
    """Scatterer centres (3, S, T) m, unit axes (3, S, T), polar semi-axes c (S,) m and radii a (S,) m."""
    start = np.stack([kin.joints[SEGMENT_JOINTS[s][0]] for s in segments], axis=1)
    end = np.stack([kin.joints[SEGMENT_JOINTS[s][1]] for s in segments], axis=1)
    axis = end - start
    half = 0.5 * np.sqrt((axis ** 2).sum(axis=0))                              # constant per segment
    centres = start + 0.5 * axis
    axis = axis / np.maximum(2 * half, 1e-12)
    lengths = person.segment_lengths_m
    c = np.array([0.5 * lengths[segment_kind(s)] for s in segments])
    a = np.array([SCATTERER_RADII_M[segment_kind(s)] * float(person.radius_scale.get(segment_kind(s), 1.0))
                  for s in segments])
    return centres, axis, c, a


def spheroid_rcs(a: np.ndarray, c: np.ndarray, cos_theta: np.ndarray) -> np.ndarray:
    """Physical-optics RCS (m^2) of a spheroid with semi-axes a = b, c (m).

    ``sigma = pi a^4 c^2 / (a^2 sin^2 theta + c^2 cos^2 theta)^2``, theta the
    angle between the line of sight and the c axis (the general ellipsoid
    formula with a = b, where the azimuth drops out).
    """
    c2 = cos_theta ** 2
    return np.pi * a ** 4 * c ** 2 / (a ** 2 * (1.0 - c2) + c ** 2 * c2) ** 2


# --------------------------------------------------------------------------
# Stage 2: radar
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Radar:
    """Monostatic CW / pulse-Doppler radar.

    ``carrier_hz`` (Hz), ``prf_hz`` slow-time sampling rate (Hz; complex
    baseband, so the unambiguous Doppler band is +-prf/2), ``distance_m``
    horizontal range to the walker's path point at mid-record (m),
    ``height_m`` antenna height (m), ``range_loss`` multiplies each return by
    ``(distance_m / R)^2`` (two-way spreading, amplitude).
    """

    carrier_hz: float = 24e9
    prf_hz: float = 3000.0
    distance_m: float = 6.0
    height_m: float = 1.0
    range_loss: bool = True

    @property
    def wavelength_m(self) -> float:
        return SPEED_OF_LIGHT / self.carrier_hz

    @property
    def position_m(self) -> np.ndarray:
        return np.array([0.0, 0.0, self.height_m])

    def doppler_hz(self, radial_speed_mps):
        """Doppler shift 2 v / lambda (Hz) of a closing radial speed (m/s)."""
        return 2.0 * np.asarray(radial_speed_mps) / self.wavelength_m

    def validate(self) -> None:
        _require(self.carrier_hz > 0 and math.isfinite(self.carrier_hz), f"carrier: must be > 0 Hz, got {self.carrier_hz}")
        _require(self.prf_hz > 0 and math.isfinite(self.prf_hz), f"prf: must be > 0 Hz, got {self.prf_hz}")
        _require(self.distance_m > 0, f"radar_distance: must be > 0 m, got {self.distance_m}")
        _require(math.isfinite(self.height_m), f"radar_height: must be finite, got {self.height_m}")


def record_times(radar: Radar, duration_s: float) -> np.ndarray:
    """Slow-time sample instants (s): ``round(duration * prf)`` samples from 0."""
    n = int(round(duration_s * radar.prf_hz))
    _require(n >= 2, f"duration: {duration_s} s gives {n} pulses at prf {radar.prf_hz} Hz")
    return np.arange(n) / radar.prf_hz


def range_and_amplitude(person: Person, kin: Kinematics, radar: Radar,
                        segments: Sequence[str] = SEGMENTS) -> tuple[np.ndarray, np.ndarray]:
    """Radar-to-scatterer range (S, T) m and return amplitude sqrt(RCS) * spreading (S, T) m."""
    centres, axes, c, a = segment_geometry(person, kin, segments)
    los = radar.position_m[:, None, None] - centres                            # (3, S, T)
    rng_m = np.sqrt(np.einsum("isk,isk->sk", los, los))
    cos_t = np.einsum("isk,isk->sk", los, axes) / rng_m
    amp = np.sqrt(spheroid_rcs(a[:, None], c[:, None], cos_t))
    if radar.range_loss:
        amp = amp * (radar.distance_m / rng_m) ** 2
    return rng_m, amp


@lru_cache(maxsize=16)
def _catmull_rom_taps(factor: int) -> np.ndarray:
    """(4, factor) Catmull-Rom weights of the ``factor`` fine samples between two coarse knots."""
    f = np.arange(factor) / factor
    f2, f3 = f * f, f * f * f
    return np.stack([(-f3 + 2 * f2 - f) / 2, (3 * f3 - 5 * f2 + 2) / 2, (-3 * f3 + 4 * f2 + f) / 2, (f3 - f2) / 2])


def _upsample(values: np.ndarray, factor: int, n_out: int) -> np.ndarray:
    """Cubic (Catmull-Rom) upsampling of ``values`` (S, N) by an integer ``factor``.

    Coarse sample ``i`` sits at fine index ``(i - 1) * factor`` (one coarse
    step before the first output); returns (S, n_out) in ``values``' dtype.
    """
    rows, n = values.shape
    windows = np.lib.stride_tricks.sliding_window_view(values, 4, axis=1).reshape(-1, 4)  # (S (N-3), 4)
    fine = windows @ _catmull_rom_taps(factor).astype(values.dtype)                      # one small GEMM
    return fine.reshape(rows, -1)[:, :n_out]


def simulate_returns(person: Person, walk: Walk, radar: Radar, duration_s: float, *,
                     rng: np.random.Generator | None = None, segments: Sequence[str] = SEGMENTS,
                     kinematics_hz: float | None = 500.0) -> tuple[np.ndarray, np.ndarray]:
    """Complex baseband slow-time return of ``person`` on ``walk``.

    ``s(t) = sum_k sqrt(sigma_k(t)) g_k(t) exp(-j 4 pi R_k(t) / lambda) + n(t)``
    over the chosen ``segments``, with R_k the radar-to-centre range (m),
    sigma_k the spheroid RCS (m^2) at the current aspect, g_k =
    (distance/R_k)^2 when ``radar.range_loss`` else 1, and n complex white
    Gaussian noise of power mean|s|^2 / 10^(snr_db/10) (none if snr_db is inf;
    ``rng`` required otherwise). Positive Doppler = closing.

    The body moves slowly compared with the PRF, so the kinematics are
    evaluated at ``kinematics_hz`` and the ranges and amplitudes are
    interpolated (cubic) to the pulse times, the rate rounded so that
    prf / rate is an integer; at the 500 Hz default the phase error is below
    0.01 rad at 24 GHz. ``kinematics_hz=None`` evaluates
    every pulse. Returns ``(times_s (T,), signal (T,) complex64)``.
    """
    unknown = [s for s in segments if s not in SEGMENT_JOINTS]
    _require(not unknown, f"segments: unknown {unknown}; choose from {list(SEGMENTS)}")
    times = record_times(radar, duration_s)
    t_mid = 0.5 * float(times[-1])
    # Phase relative to the reference range: the constant offset only rotates
    # the overall phase, and it keeps the values small enough for float32
    # (|phase| < ~1e4 rad, resolution < 1e-3 rad).
    k = -4.0 * np.pi / radar.wavelength_m
    if kinematics_hz is None or kinematics_hz >= radar.prf_hz:
        kin = body_kinematics(person, walk, times, distance_m=radar.distance_m, t_mid_s=t_mid)
        rng_m, amp = range_and_amplitude(person, kin, radar, segments)
        phase, amp = (k * (rng_m - radar.distance_m)).astype(np.float32), amp.astype(np.float32)
    else:
        _require(kinematics_hz > 0, f"kinematics_hz: must be > 0, got {kinematics_hz}")
        factor = max(1, int(round(radar.prf_hz / kinematics_hz)))            # integer: polyphase taps
        n_coarse = times.size // factor + 4
        coarse = (np.arange(n_coarse) - 1.0) * (factor / radar.prf_hz)       # one step before t = 0
        kin = body_kinematics(person, walk, coarse, distance_m=radar.distance_m, t_mid_s=t_mid)
        r_c, a_c = range_and_amplitude(person, kin, radar, segments)
        both = np.concatenate([k * (r_c - radar.distance_m), a_c]).astype(np.float32)
        phase, amp = np.split(_upsample(both, factor, times.size), 2)
    signal = (amp * np.cos(phase)).sum(axis=0) + 1j * (amp * np.sin(phase)).sum(axis=0)
    signal = signal.astype(np.complex64, copy=False)
    if math.isfinite(walk.snr_db):
        _require(rng is not None, "simulate_returns: an rng is needed to add noise (snr_db is finite)")
        noise_power = float(np.mean(np.abs(signal) ** 2)) / 10.0 ** (walk.snr_db / 10.0)
        noise = rng.standard_normal((2, times.size), dtype=np.float32) * np.float32(math.sqrt(noise_power / 2.0))
        signal = signal + (noise[0] + 1j * noise[1])
    return times, signal


def peak_speeds(person: Person, walk: Walk, prf_hz: float = 2000.0) -> dict[str, float]:
    """Peak 3-D speed (m/s) of each segment's scatterer over one gait cycle.

    An upper bound of each segment's radial speed; the PRF must exceed
    ``4 * max / lambda`` for the two-sided Doppler band.
    """
    timing = person.timing(walk.rv)
    times = np.arange(int(math.ceil(timing.cycle_s * prf_hz)) + 2) / prf_hz
    kin = body_kinematics(person, replace(walk, aspect_deg=0.0), times)
    centres = segment_geometry(person, kin)[0]
    speed = np.sqrt((np.diff(centres, axis=2) ** 2).sum(axis=0)) * prf_hz   # (S, T-1)
    return {s: float(v) for s, v in zip(SEGMENTS, speed.max(axis=1))}


# --------------------------------------------------------------------------
# Stage 3: spectrogram
# --------------------------------------------------------------------------

COLORMAPS = ("gray", "jet")


@dataclass(frozen=True)
class SpectrogramSettings:
    """STFT and image settings.

    ``window_s`` Hann window length (s); ``overlap`` fraction of a window
    shared by successive frames; ``nfft`` FFT length (0 = the next power of
    two >= 2 windows); ``dynamic_range_db`` kept below the image's peak;
    ``velocity_band_mps`` (low, high) radial velocity shown (m/s; Doppler
    2 v / lambda; positive = closing), bottom to top; ``image_size`` pixels
    (square); ``colormap`` ``gray`` (one channel) or ``jet`` (RGB).
    """

    window_s: float = 0.1
    overlap: float = 0.8
    nfft: int = 0
    dynamic_range_db: float = 45.0
    velocity_band_mps: tuple[float, float] = (-1.5, 7.5)
    image_size: int = 64
    colormap: str = "gray"

    def window_samples(self, prf_hz: float) -> int:
        return max(8, int(round(self.window_s * prf_hz)))

    def hop_samples(self, prf_hz: float) -> int:
        return max(1, int(round(self.window_samples(prf_hz) * (1.0 - self.overlap))))

    def fft_size(self, prf_hz: float) -> int:
        if self.nfft:
            return int(self.nfft)
        return 1 << int(math.ceil(math.log2(2 * self.window_samples(prf_hz))))

    def validate(self, radar: Radar) -> None:
        _require(self.window_s > 0, f"window: must be > 0 s, got {self.window_s}")
        _require(0 <= self.overlap < 1, f"overlap: must be in [0, 1), got {self.overlap}")
        win = self.window_samples(radar.prf_hz)
        _require(self.nfft == 0 or self.nfft >= win,
                 f"nfft: {self.nfft} is shorter than the window ({win} samples)")
        _require(self.dynamic_range_db > 0, f"dynamic_range_db: must be > 0, got {self.dynamic_range_db}")
        lo, hi = self.velocity_band_mps
        _require(lo < hi, f"velocity_band: low {lo} must be below high {hi} m/s")
        nyq = radar.prf_hz * radar.wavelength_m / 4.0
        _require(max(abs(lo), abs(hi)) <= nyq,
                 f"velocity_band: {lo}..{hi} m/s exceeds the unambiguous +-{nyq:.2f} m/s of prf "
                 f"{radar.prf_hz:g} Hz at {radar.carrier_hz / 1e9:g} GHz")
        _require(8 <= self.image_size <= 1024, f"image_size: must be in 8..1024, got {self.image_size}")
        _require(self.colormap in COLORMAPS, f"colormap: must be one of {COLORMAPS}, got {self.colormap!r}")


def stft(signal: np.ndarray, prf_hz: float, window_samples: int, hop_samples: int, nfft: int):
    """Short-time power spectrum of a complex slow-time signal.

    Periodic Hann window, frames without padding. Returns ``freqs_hz`` (F,)
    in FFT order (``numpy.fft.fftfreq``: 0 first, negative half last),
    ``frame_times_s`` (N,) frame centres and ``power`` (F, N) (linear, |X|^2).
    """
    x = np.asarray(signal)
    _require(x.size >= window_samples, f"signal: {x.size} samples is shorter than the window ({window_samples})")
    _require(nfft >= window_samples, f"nfft: {nfft} is shorter than the window ({window_samples})")
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window_samples) / window_samples)).astype(np.float32)
    view = np.lib.stride_tricks.sliding_window_view(x, window_samples)[::hop_samples]
    frames = np.zeros((view.shape[0], nfft), dtype=np.result_type(x.dtype, np.complex64))   # zero-padded
    np.multiply(view, window, out=frames[:, :window_samples])
    spec = scipy.fft.fft(frames, axis=1, overwrite_x=True)
    power = (spec.real ** 2 + spec.imag ** 2).T
    freqs = np.fft.fftfreq(nfft, 1.0 / prf_hz)
    times = (np.arange(view.shape[0]) * hop_samples + window_samples / 2.0) / prf_hz
    return freqs, times, power


@lru_cache(maxsize=64)
def _area_matrix(in_lo: float, in_step: float, n_in: int, out_lo: float, out_hi: float, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights averaging input cells [lo + i step +- step/2] over output cells.

    Rows sum to one where any input overlaps (partial coverage at the edges is
    renormalised, not darkened).
    """
    centres = in_lo + in_step * np.arange(n_in)
    cell_lo, cell_hi = centres - in_step / 2, centres + in_step / 2
    edges = np.linspace(out_lo, out_hi, n_out + 1)
    overlap = np.clip(np.minimum(edges[1:, None], cell_hi[None]) - np.maximum(edges[:-1, None], cell_lo[None]), 0, None)
    total = overlap.sum(axis=1, keepdims=True)
    return overlap / np.where(total > 0, total, 1.0)


@lru_cache(maxsize=64)
def _band_matrix(prf_hz: float, nfft: int, f_lo: float, f_hi: float, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """FFT-order bin indices inside [f_lo, f_hi] (ascending frequency) and their area weights (n_out, bins)."""
    df = prf_hz / nfft
    k_lo = int(math.floor(f_lo / df - 0.5))
    k_hi = int(math.ceil(f_hi / df + 0.5))
    ks = np.arange(k_lo, k_hi + 1)
    weights = _area_matrix(k_lo * df, df, ks.size, f_lo, f_hi, n_out).astype(np.float32)
    return np.mod(ks, nfft), weights


def spectrogram(signal: np.ndarray, radar: Radar, settings: SpectrogramSettings = SpectrogramSettings(),
                duration_s: float | None = None) -> np.ndarray:
    """Spectrogram image of a slow-time signal, float32 (size, size) in [0, 1].

    Power spectrogram (Hann STFT), resampled by area averaging onto the
    velocity band (rows, top = ``velocity_band_mps[1]``) and onto the
    ``duration_s`` seconds of complete frames starting at the first frame centre
    (columns; default all of them), converted to dB relative to the image peak,
    clipped at ``-dynamic_range_db`` and scaled to [0, 1].
    """
    win = settings.window_samples(radar.prf_hz)
    hop = settings.hop_samples(radar.prf_hz)
    nfft = settings.fft_size(radar.prf_hz)
    _, times, power = stft(signal, radar.prf_hz, win, hop, nfft)
    size = settings.image_size
    lo, hi = (float(radar.doppler_hz(v)) for v in settings.velocity_band_mps)
    bins, wf = _band_matrix(float(radar.prf_hz), nfft, lo, hi, size)
    t0 = float(times[0])
    span = duration_s if duration_s is not None else float(times[-1] - times[0])
    wt = _area_matrix(t0, hop / radar.prf_hz, times.size, t0, t0 + span, size).astype(np.float32)
    image = wf @ power[bins] @ wt.T                                            # (size, size), low freq first
    db = 10.0 * np.log10(np.maximum(image[::-1], 1e-30))                       # top row = highest Doppler
    scaled = (db - (db.max() - settings.dynamic_range_db)) / settings.dynamic_range_db
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def _jet_table() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.clip(1.5 - np.abs(4 * x - k), 0, 1) for k in (3, 2, 1)], axis=1)
    return np.round(rgb * 255).astype(np.uint8)


_JET = _jet_table()


def to_uint8(image: np.ndarray, colormap: str = "gray") -> np.ndarray:
    """[0, 1] image -> uint8 (H, W) for ``gray`` or (H, W, 3) for ``jet``."""
    _require(colormap in COLORMAPS, f"colormap: must be one of {COLORMAPS}, got {colormap!r}")
    levels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    return levels if colormap == "gray" else _JET[levels]


def render_sample(person: Person, walk: Walk, radar: Radar, settings: SpectrogramSettings,
                  duration_s: float, rng: np.random.Generator | None) -> np.ndarray:
    """One uint8 spectrogram image covering ``duration_s`` seconds of walking.

    The return is simulated for ``duration_s`` plus one window so that the
    image's time axis holds only complete STFT frames.
    """
    total = duration_s + settings.window_samples(radar.prf_hz) / radar.prf_hz
    _, signal = simulate_returns(person, walk, radar, total, rng=rng)
    image = spectrogram(signal, radar, settings, duration_s=duration_s)
    return to_uint8(image, settings.colormap)


def sample_rng(seed: int, user: int, sample: int) -> np.random.Generator:
    """The generator of sample ``sample`` of user ``user`` (both from 0)."""
    return np.random.default_rng([seed, 1, user, sample])


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) grayscale or (H, W, 3) RGB image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# --------------------------------------------------------------------------
# Stage 4: data set
# --------------------------------------------------------------------------

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


def _round_floats(obj, digits: int = 6):
    if isinstance(obj, float):
        return round(obj, digits) if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {k: _round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round_floats(v, digits) for v in obj]
    return obj


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
    _require(isinstance(num_users, int) and num_users >= 1, f"num_users: must be an integer >= 1, got {num_users}")
    _require(isinstance(samples_per_user, int) and samples_per_user >= 1,
             f"samples_per_user: must be an integer >= 1, got {samples_per_user}")
    _require(duration_s > 0 and math.isfinite(duration_s), f"duration: must be > 0 s, got {duration_s}")
    _require(isinstance(workers, int) and workers >= 1, f"workers: must be >= 1, got {workers}")
    radar.validate()
    _validate_walk_variation(walk_variation)
    _validate_person_variation(person_variation, walk_variation.speed_jitter)
    people_seed = seed if people_seed is None else people_seed
    people = make_people(num_users, people_seed, person_variation)
    peak = check_prf(people, radar, walk_variation)
    settings.validate(radar)
    _require(settings.window_s < duration_s, f"window: {settings.window_s} s must be shorter than duration {duration_s} s")

    out = Path(output_dir).expanduser().absolute()
    _require(out.name not in ("", ".", ".."), f"output_dir: {output_dir!r} is not a folder name")
    if out.exists():
        _require(out.is_dir(), f"output_dir: {out} exists and is not a folder")
        _require(overwrite or not any(out.iterdir()), f"output_dir: {out} exists and is not empty (use --overwrite)")
    parent = out.parent
    _require(parent.is_dir(), f"output_dir: parent folder {parent} does not exist")

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    try:
        for person in people:
            (tmp / person.name).mkdir()
        digits = max(3, len(str(samples_per_user - 1)))
        job = _Job(tuple(people), radar, settings, walk_variation, duration_s, seed, str(tmp), digits)
        tasks = [(u, j) for u in range(num_users) for j in range(samples_per_user)]
        bar = None
        if progress:
            try:
                from tqdm import tqdm
                bar = tqdm(total=len(tasks), unit="img", desc="spectrograms", file=sys.stderr)
            except ImportError:  # pragma: no cover
                bar = None
        records = []
        if workers == 1:
            _init_worker(job)
            iterator = map(_make_one, tasks)
            pool = None
        else:
            import multiprocessing as mp

            pool = mp.get_context("spawn" if sys.platform == "win32" else "fork").Pool(
                workers, initializer=_init_worker, initargs=(job,))
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
        elapsed = time.perf_counter() - t_start

        with open(tmp / "samples.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        f_lo, f_hi = (float(radar.doppler_hz(v)) for v in settings.velocity_band_mps)
        metadata = {
            "format": "microdoppler-image-folder/1",
            "generator": f"datasets/microdoppler.py {__version__}",
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
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=1) + "\n")

        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / "data")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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
                               command=["datasets/microdoppler.py", *argv])
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
