"""Radar micro-Doppler spectrograms of walking people, one class per person.

The simulator chains four stages, each usable on its own and each a module
of this package (``body``, ``radar``, ``spectrogram``, ``dataset``; ``cli`` is
the command line):

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

Command line (``python -m guided_diffusion_vae.simulate --help`` lists every
option; ``python datasets/microdoppler.py`` is the same)::

    python -m guided_diffusion_vae.simulate --output_dir data/md31 --num_users 31 \\
        --samples_per_user 200 --image_size 64 --seed 0

Determinism: person ``i`` depends only on ``(people_seed, i)`` and sample
``j`` of person ``i`` only on ``(seed, i, j)``, so the same arguments give
byte-identical PNGs, whatever ``--workers`` is, and enlarging a data set keeps
its existing images.
"""

from .body import (  # noqa: F401
    CURVE_SLOTS,
    GaitTiming,
    Kinematics,
    Person,
    PersonVariation,
    RV_MAX,
    SCATTERER_RADII_M,
    SEGMENTS,
    SEGMENT_JOINTS,
    SEGMENT_LENGTH_RATIOS,
    SPEED_OF_LIGHT,
    SWING_GROUPS,
    SimulationError,
    Walk,
    WalkVariation,
    body_kinematics,
    draw_walk,
    gait_regime,
    gait_timing,
    joint_angles,
    make_people,
    make_person,
    segment_geometry,
    segment_kind,
    user_name,
)
from .radar import (  # noqa: F401
    Radar,
    peak_speeds,
    range_and_amplitude,
    record_times,
    simulate_returns,
    spheroid_rcs,
)
from .spectrogram import (  # noqa: F401
    COLORMAPS,
    SpectrogramSettings,
    encode_png,
    render_sample,
    sample_rng,
    spectrogram,
    stft,
    to_uint8,
)
from .dataset import (  # noqa: F401
    SIMULATOR_VERSION,
    benchmark,
    check_prf,
    simulate_dataset,
)
from .cli import (  # noqa: F401
    build_parser,
    main,
)

__version__ = SIMULATOR_VERSION
