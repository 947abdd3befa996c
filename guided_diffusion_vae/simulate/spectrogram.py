"""From baseband returns to an image: STFT, dB, a fixed dynamic range and
Doppler band, area resampling to the image size, gray or jet (stage 3)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft

from .body import Person, Walk, _require
from .radar import Radar, simulate_returns

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
