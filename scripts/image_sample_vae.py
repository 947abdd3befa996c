"""Generate images per user from a latent diffusion checkpoint (EMA weights by default).

    python scripts/image_sample_vae.py --model_path RUN_DIR_OR_CKPT --user_ids 1 5 10 15 \\
        --num_images_per_user 5 --output_dir out --use_ddim True --timestep_respacing ddim50 --seed 42

Writes out/user_01/generated_000.png, ..., grid.png and samples_NxHxWxC.npz. The
checkpoint names its VAE; --vae_path points elsewhere if it has moved.
"""

import os
import sys

# Run from a checkout, the script uses that checkout's package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_vae.runtime.config import parse_with_config  # noqa: E402
from guided_diffusion_vae.runtime.errors import run_main  # noqa: E402
from guided_diffusion_vae.sampling.sample_from_checkpoint import latent_sample_defaults, run_sampling  # noqa: E402


def main(argv=None):
    run_sampling(parse_with_config(latent_sample_defaults(), argv, description=__doc__))


if __name__ == "__main__":
    sys.exit(run_main(main))
