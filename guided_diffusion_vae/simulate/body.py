"""Walking bodies: the Boulic-Thalmann gait model, people and their walks, and
forward kinematics to joint and segment positions in metres (stage 1 of the
simulator; see the package docstring)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..runtime.errors import UserError

SPEED_OF_LIGHT = 299_792_458.0  # m/s


class SimulationError(UserError):
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



def _round_floats(obj, digits: int = 6):
    if isinstance(obj, float):
        return round(obj, digits) if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {k: _round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round_floats(v, digits) for v in obj]
    return obj
