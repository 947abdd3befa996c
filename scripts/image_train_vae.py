"""Train a class-conditional diffusion model in the latent space of your VAE.

    mpiexec -n 2 python scripts/image_train_vae.py --config configs/microdoppler_small.yaml \\
        --latent_cache CACHE_DIR            # or: --data_dir IMAGES --vae_path VAE_DIR

Every guided-diffusion model, diffusion and training flag works here; image_size
is in pixels and the network is built for the VAE's latent size.
"""

import os
import sys

# Run from a checkout, the script uses that checkout's package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_vae.evaluation.monitor import build_monitor  # noqa: E402
from guided_diffusion_vae.runtime.config import parse_with_config  # noqa: E402
from guided_diffusion_vae.runtime.errors import run_main  # noqa: E402
from guided_diffusion_vae.training.diffusion_training import run_training  # noqa: E402
from guided_diffusion_vae.training.latent_training import latent_train_defaults, latent_training_data  # noqa: E402


def main(argv=None):
    run_training(parse_with_config(latent_train_defaults(), argv, description=__doc__), latent_training_data,
                 build_monitor)


if __name__ == "__main__":
    sys.exit(run_main(main))
