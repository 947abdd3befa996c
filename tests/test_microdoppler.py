"""Physics and I/O tests of the micro-Doppler simulator (guided_diffusion_vae.simulate).

The API is tested through the package; the command line through the thin
``datasets/microdoppler.py`` wrapper users run, loaded from its file path (the
folder name ``datasets`` clashes with the HuggingFace package of that name),
which must re-export the same API.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "datasets" / "microdoppler.py"


def _load():
    name = "microdoppler"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


from guided_diffusion_vae import simulate as md  # noqa: E402
from guided_diffusion_vae.simulate import dataset as simulate_dataset_module  # noqa: E402


def test_the_script_wrapper_reexports_the_package():
    wrapper = _load()
    for name in ("simulate_dataset", "Radar", "Person", "SimulationError", "main", "render_sample"):
        assert getattr(wrapper, name) is getattr(md, name), name

H, V = 1.8, 1.4  # the reference walker: 1.8 m tall, 1.4 m/s


@pytest.fixture(scope="module")
def walker():
    return md.Person(height_m=H, rv=V / (0.491 * H))


def far_radar(**kw):
    """A distant radar: plane-wave geometry, constant aspect, no range loss."""
    return md.Radar(**{"distance_m": 200.0, "height_m": 1.0, "range_loss": False, **kw})


# --------------------------------------------------------------------------- units and kinematics

def test_gait_timing_units():
    t = md.gait_timing(H, V)
    assert t.leg_length_m == pytest.approx(0.491 * 1.8)            # m
    assert t.rv == pytest.approx(1.584, abs=2e-3)                  # 1/s
    assert t.relative_cycle_length == pytest.approx(1.346 * math.sqrt(t.rv))
    assert t.cycle_s == pytest.approx(1.069, abs=2e-3)             # s
    assert t.stride_m == pytest.approx(1.497, abs=2e-3)            # m
    assert t.stride_m == pytest.approx(V * t.cycle_s)              # metres = m/s * s
    assert t.support_s == pytest.approx(0.752 * t.cycle_s - 0.143)
    assert 0.55 < t.support_fraction < 0.7
    assert t.cadence_steps_per_min == pytest.approx(112, abs=1)    # ordinary walking cadence
    with pytest.raises(md.SimulationError, match="RV"):
        md.gait_timing(1.8, 5.0)                                   # RV > 3: outside the model


def test_kinematics_in_metres_and_seconds(walker):
    timing = walker.timing()
    times = np.arange(0.0, 3 * timing.cycle_s, 1e-3)
    kin = md.body_kinematics(walker, md.Walk(rv=walker.rv, aspect_deg=0.0), times, distance_m=20.0)
    base = kin.joints["base"]
    one_cycle = int(round(timing.cycle_s / 1e-3))
    # The body advances one stride (metres) per cycle (seconds): not RLc "metres".
    advance = np.linalg.norm(base[:2, one_cycle:] - base[:2, :-one_cycle], axis=0)
    assert advance.mean() == pytest.approx(timing.stride_m, rel=2e-3)
    mean_speed = np.linalg.norm(base[:2, -1] - base[:2, 0]) / (times[-1] - times[0])
    assert mean_speed == pytest.approx(V, rel=1e-2)
    # Spine-base bob and sway of a few centimetres; head near body height; feet on the ground.
    bob = np.ptp(base[2])
    assert 0.02 < bob < 0.06
    sway = np.ptp(base[1])
    assert 0.03 < sway < 0.09
    assert kin.joints["head_top"][2].max() == pytest.approx(H, rel=0.05)
    lowest = min(kin.joints[j][2].min() for j in ("toe_l", "toe_r", "ankle_l", "ankle_r"))
    assert lowest == pytest.approx(0.0, abs=1e-9)
    # Segment lengths are preserved by the forward kinematics.
    lengths = walker.segment_lengths_m
    shank = np.linalg.norm(kin.joints["ankle_r"] - kin.joints["knee_r"], axis=0)
    forearm = np.linalg.norm(kin.joints["hand_l"] - kin.joints["elbow_l"], axis=0)
    np.testing.assert_allclose(shank, lengths["shank"], rtol=1e-9)
    np.testing.assert_allclose(forearm, lengths["forearm"], rtol=1e-9)


def test_feet_and_arms_move_as_in_walking(walker):
    timing = walker.timing()
    dt = 1e-3
    times = np.arange(0.0, 2 * timing.cycle_s, dt)
    kin = md.body_kinematics(walker, md.Walk(rv=walker.rv, aspect_deg=0.0), times, distance_m=20.0)
    heading = kin.heading

    def forward_speed(joint):
        return np.gradient(kin.joints[joint].T @ heading, dt)

    ankle = forward_speed("ankle_r")
    # Stance: the foot is nearly still for about the support fraction of the cycle ...
    still = np.mean(np.abs(ankle) < 0.35 * V)
    assert 0.4 < still < 0.75
    # ... so in swing it must cover a stride quickly: peak ~3.5-4x the walking speed.
    assert 3.0 < ankle.max() / V < 4.5
    # Arms swing in antiphase to each other, and each against the leg on its side.
    left, right = forward_speed("hand_l"), forward_speed("hand_r")
    assert np.corrcoef(left, right)[0, 1] < -0.8
    assert np.corrcoef(left, forward_speed("ankle_l"))[0, 1] < -0.3


# --------------------------------------------------------------------------- radar and spectrogram physics

@pytest.mark.parametrize("aspect", [0.0, 30.0, 60.0, 150.0])
def test_torso_doppler_is_2v_cos_aspect_over_lambda(walker, aspect):
    radar = far_radar(height_m=1.25)
    timing = walker.timing()
    walk = md.Walk(rv=walker.rv, start_phase=0.2, aspect_deg=aspect)
    _, s = md.simulate_returns(walker, walk, radar, 3 * timing.cycle_s, segments=("torso",))
    window = np.hanning(s.size)
    spec = np.abs(np.fft.fft(s * window, 8 * s.size)) ** 2
    freqs = np.fft.fftfreq(8 * s.size, 1.0 / radar.prf_hz)
    centroid = (freqs * spec).sum() / spec.sum()
    expected = 2 * V * math.cos(math.radians(aspect)) / radar.wavelength_m   # Hz; 224 Hz at 24 GHz, 0 deg
    assert centroid == pytest.approx(expected, rel=2e-3)


def test_peak_limb_doppler_matches_kinematics(walker):
    radar = far_radar()
    walk = md.Walk(rv=walker.rv, start_phase=0.0, aspect_deg=0.0)
    times, s = md.simulate_returns(walker, walk, radar, 3.0)
    freqs, _, power = md.stft(s, radar.prf_hz, 300, 15, 1024)
    above = power >= power.max() * 10 ** (-40 / 10)                      # the top 40 dB
    envelope = np.array([freqs[col].max() for col in above.T])
    measured = envelope.max() * radar.wavelength_m / 2                     # m/s
    kin = md.body_kinematics(walker, walk, times, distance_m=radar.distance_m)
    ranges, _ = md.range_and_amplitude(walker, kin, radar)
    radial = -np.gradient(ranges, times, axis=1)                           # closing speed per segment
    feet = [md.SEGMENTS.index("foot_l"), md.SEGMENTS.index("foot_r")]
    assert measured == pytest.approx(radial[feet].max(), rel=0.04)
    assert radial.max() == radial[feet].max()                              # the feet are the fastest
    torso = 2 * V / radar.wavelength_m
    assert 3.0 < envelope.max() / torso < 4.5


def _step_period(person, walk, radar, duration):
    """Period of the leg/foot energy above 1.8x the torso Doppler (s), by autocorrelation."""
    timing = person.timing(walk.rv)
    _, s = md.simulate_returns(person, walk, radar, duration, rng=np.random.default_rng(1))
    freqs, frame_t, power = md.stft(s, radar.prf_hz, 300, 15, 512)
    torso = 2 * timing.speed_mps * math.cos(math.radians(walk.aspect_deg)) / radar.wavelength_m
    energy = np.log(power[freqs > 1.8 * torso].sum(axis=0))
    energy -= np.polyval(np.polyfit(frame_t, energy, 1), frame_t)          # range-loss trend
    ac = np.correlate(energy, energy, "full")[energy.size - 1:]
    dt = frame_t[1] - frame_t[0]
    lags = np.arange(ac.size) * dt
    found = []
    for lo, hi in ((0.3, 0.75), (0.8, 1.2)):
        k = int(np.argmax(np.where((lags > lo * timing.cycle_s) & (lags < hi * timing.cycle_s), ac, -np.inf)))
        k += 0.5 * (ac[k - 1] - ac[k + 1]) / (ac[k - 1] - 2 * ac[k] + ac[k + 1])   # parabolic peak
        found.append(k * dt)
    return found, timing.cycle_s


@pytest.mark.parametrize("index", [0, 1])
def test_gait_period_visible_in_spectrogram(index):
    person = md.make_people(2, seed=5)[index]
    walk = md.Walk(rv=person.rv, start_phase=0.37, aspect_deg=20.0, snr_db=20.0)
    (step, cycle), dc = _step_period(person, walk, md.Radar(distance_m=10.0), 6.0)
    assert step == pytest.approx(dc / 2, rel=0.02)                         # one step = Dc/2
    assert cycle == pytest.approx(dc, rel=0.02)


def test_noise_has_the_requested_snr(walker):
    radar = md.Radar()
    clean = md.simulate_returns(walker, md.Walk(rv=walker.rv), radar, 1.0)[1]
    noisy = md.simulate_returns(walker, md.Walk(rv=walker.rv, snr_db=13.0), radar, 1.0,
                                rng=np.random.default_rng(3))[1]
    noise = noisy - clean
    snr = 10 * np.log10(np.mean(np.abs(clean) ** 2) / np.mean(np.abs(noise) ** 2))
    assert snr == pytest.approx(13.0, abs=0.2)


def test_coarse_kinematics_keep_the_phase(walker):
    radar = md.Radar()
    walk = md.Walk(rv=walker.rv * 1.05, start_phase=0.3, aspect_deg=20.0)
    exact = md.simulate_returns(walker, walk, radar, 2.0, kinematics_hz=None)[1]
    fast = md.simulate_returns(walker, walk, radar, 2.0)[1]
    assert np.abs(np.angle(fast * np.conj(exact))).max() < 0.01            # rad


def test_spheroid_rcs_limits():
    a, c = 0.07, 0.22
    assert md.spheroid_rcs(a, c, 0.0) == pytest.approx(math.pi * c ** 2)      # broadside
    assert md.spheroid_rcs(a, c, 1.0) == pytest.approx(math.pi * a ** 4 / c ** 2)  # end-on
    assert md.spheroid_rcs(a, a, 0.3) == pytest.approx(math.pi * a ** 2)      # sphere


def test_spectrogram_image_layout(walker):
    radar = md.Radar()
    settings = md.SpectrogramSettings(image_size=128, colormap="jet")
    walk = md.Walk(rv=walker.rv, aspect_deg=0.0, snr_db=25.0)
    pixels = md.render_sample(walker, walk, radar, settings, 3.0, np.random.default_rng(0))
    assert pixels.shape == (128, 128, 3) and pixels.dtype == np.uint8
    gray = md.render_sample(walker, walk, radar, md.SpectrogramSettings(), 3.0, np.random.default_rng(0))
    assert gray.shape == (64, 64)
    # The brightest row is the torso line: 2 v / lambda in a band from -1.5 (bottom) to 7.5 m/s (top).
    row = int(np.argmax(gray.astype(float).mean(axis=1)))
    lo, hi = settings.velocity_band_mps
    velocity = hi - (row + 0.5) * (hi - lo) / 64
    assert velocity == pytest.approx(V, abs=0.3)


# --------------------------------------------------------------------------- determinism and output

def test_same_seed_same_images_different_seed_different(tmp_path):
    kw = dict(num_users=2, samples_per_user=2, image_size=64)
    a = md.simulate_dataset(tmp_path / "a", seed=7, **kw)
    b = md.simulate_dataset(tmp_path / "b", seed=7, workers=2, **kw)
    c = md.simulate_dataset(tmp_path / "c", seed=8, **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 4
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()
        assert (a / f).read_bytes() != (c / f).read_bytes()
    # People depend on (people_seed, index) only.
    assert md.make_people(3, 7)[:2] == md.make_people(2, 7)


def test_cli_writes_folder_layout_and_metadata(tmp_path):
    out = tmp_path / "md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(out), "--num_users", "3",
                           "--samples_per_user", "2", "--image_size", "64", "--seed", "0", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "samples.csv", "user_01", "user_02", "user_03"]
    assert sorted(p.name for p in (out / "user_02").iterdir()) == ["000.png", "001.png"]
    from PIL import Image

    with Image.open(out / "user_03" / "001.png") as im:
        assert im.size == (64, 64) and im.mode == "L"
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["label_map"] == {"0": "user_01", "1": "user_02", "2": "user_03"}
    assert meta["radar"]["carrier_hz"] == 24e9 and meta["radar"]["prf_hz"] > meta["radar"]["nyquist_prf_hz"]
    assert [p["name"] for p in meta["people"]] == ["user_01", "user_02", "user_03"]
    person = meta["people"][0]
    assert 1.5 <= person["height_m"] <= 1.95 and person["derived"]["cycle_s"] > 0.5
    assert md.Person.from_dict(person) == md.make_people(3, 0)[0]
    assert meta["spectrogram"]["image_size"] == 64
    lines = (out / "samples.csv").read_text().splitlines()
    assert len(lines) == 1 + 6 and lines[0].startswith("file,user,label")


@pytest.mark.parametrize("args, culprit", [
    (["--prf", "500"], "prf"),
    (["--num_users", "0"], "num_users"),
    (["--velocity_band", "5", "1"], "velocity_band"),
    (["--snr_db", "30", "10"], "snr_db"),
    (["--image_size", "100"], "image_size"),
    (["--colour", "jet"], "--colour"),
])
def test_cli_bad_argument_exits_nonzero_with_one_line(tmp_path, args, culprit):
    out = tmp_path / "md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(out), "--samples_per_user", "1",
                           "--quiet", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0], proc.stderr
    assert not out.exists()


def test_existing_output_is_refused_then_replaced_atomically(tmp_path):
    out = tmp_path / "md"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(md.SimulationError, match="output_dir"):
        md.simulate_dataset(out, num_users=1, samples_per_user=1)
    md.simulate_dataset(out, num_users=1, samples_per_user=1, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "user_01" / "000.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["md"]                 # no temporary leftovers


def test_error_midway_leaves_no_partial_output(tmp_path, monkeypatch):
    real = md.render_sample
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(simulate_dataset_module, "render_sample", flaky)
    previous = tmp_path / "old"
    md.simulate_dataset(previous, num_users=1, samples_per_user=1)
    before = (previous / "user_01" / "000.png").read_bytes()
    for target, overwrite in ((tmp_path / "new", False), (previous, True)):
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="disk on fire"):
            md.simulate_dataset(target, num_users=2, samples_per_user=2, overwrite=overwrite)
    assert not (tmp_path / "new").exists()
    assert (previous / "user_01" / "000.png").read_bytes() == before          # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def _blas_threads(task=None):
    """BLAS threads of this process (each library numpy and scipy load)."""
    from threadpoolctl import threadpool_info

    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def test_each_simulator_worker_runs_one_blas_thread(monkeypatch):
    """Pool workers limit BLAS to one thread, whatever the caller's setting
    (a Python caller cannot set OPENBLAS_NUM_THREADS before numpy loads), and
    leave the caller's own setting alone."""
    from threadpoolctl import threadpool_limits

    monkeypatch.setattr(simulate_dataset_module, "_make_one", _blas_threads)  # forked workers see it
    with threadpool_limits(limits=2, user_api="blas"):
        assert _blas_threads() == {2}
        records = simulate_dataset_module._render_all(None, [(0, 0), (0, 1), (1, 0)], workers=2, progress=False)
        assert _blas_threads() == {2}
    assert records == [{1}] * 3
