"""Sample a pixel-space model: writes PNGs per class, a grid and the original's .npz.

    python scripts/image_sample.py --model_path runs/pixels --output_dir out --num_samples 16
"""

import os
import sys

# Run from a checkout, the script uses that checkout's package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_vae.runtime.config import parse_with_config  # noqa: E402
from guided_diffusion_vae.runtime.errors import run_main  # noqa: E402
from guided_diffusion_vae.sampling.sample_from_checkpoint import run_sampling, sample_defaults  # noqa: E402


def main(argv=None):
    run_sampling(parse_with_config(sample_defaults(), argv, description=__doc__))


if __name__ == "__main__":
    sys.exit(run_main(main))
