"""Radar returns of a walking body: spheroid scatterers with an aspect-dependent
RCS, summed coherently, plus noise at a chosen SNR (stage 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Sequence

import numpy as np

from .body import Kinematics, Person, SEGMENTS, SEGMENT_JOINTS, SPEED_OF_LIGHT, Walk, _require, body_kinematics, segment_geometry

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
