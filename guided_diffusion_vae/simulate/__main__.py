"""``python -m guided_diffusion_vae.simulate``: the simulator's command line."""

import os
import sys

# One process per core (--workers): BLAS threads would only compete with them.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from .cli import main

sys.exit(main())
