#!/usr/bin/env python3
"""Radar micro-Doppler spectrograms of walking people, one class per person.

The simulator lives in the package, ``guided_diffusion_vae.simulate`` (its
docstring describes the model); this file keeps the command line where the
data-set docs (``datasets/README.md``) point to, and re-exports the API::

    python datasets/microdoppler.py --output_dir data/md31 --num_users 31 \\
        --samples_per_user 200 --image_size 64 --seed 0
    # the same: python -m guided_diffusion_vae.simulate ...
"""

import os
import sys

if __name__ == "__main__":
    # One process per core (--workers): BLAS threads would only compete with them.
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
    # Runnable from a checkout without installing the package.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_vae.simulate import *  # noqa: E402,F401,F403
from guided_diffusion_vae.simulate import __version__, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
