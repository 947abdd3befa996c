"""Encode an image folder once into a latent cache for diffusion training.

    python scripts/encode_latents.py --data_dir IMAGES --vae_path VAE_DIR \\
        --image_size 64 --output_dir CACHE_DIR [--batch_size 64] [--random_flip True] \\
        [--latent_scale measured | stored | X] [--sample_posterior False] [--input_range -1,1]

Rerunning continues an interrupted build; ``mpiexec -n N`` splits the work.
See guided_diffusion_vae/latent/latent_datasets.py for the cache layout.
"""

import os
import sys

# Run from a checkout, the script uses that checkout's package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_vae.latent.latent_datasets import build_latent_cache, encode_latents_defaults  # noqa: E402
from guided_diffusion_vae.runtime.config import parse_with_config  # noqa: E402
from guided_diffusion_vae.runtime.errors import run_main  # noqa: E402


def main(argv=None):
    defaults = encode_latents_defaults()
    config = parse_with_config(defaults, argv, description=__doc__)
    build_latent_cache(**{key: config[key] for key in defaults})


if __name__ == "__main__":
    sys.exit(run_main(main))
