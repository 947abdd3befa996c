"""Train the AutoencoderKL whose latents the diffusion model learns.

    python scripts/vae_train.py --data_dir IMAGES --image_size 64 --output_dir VAE_DIR \\
        [--lr_anneal_steps N] [--batch_size B] [--vae_size tiny|small|base]

Saves a diffusers directory (``AutoencoderKL.from_pretrained(VAE_DIR)``) with
latent_stats.json, metrics.json and reconstructions.png; training state and
logs go to VAE_DIR_train (rerun to resume). ``mpiexec -n N`` or torchrun for
several GPUs. See guided_diffusion_vae/training/vae_training.py.
"""

import os
import sys

# Run from a checkout, the script uses that checkout's package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_vae.runtime.config import parse_with_config  # noqa: E402
from guided_diffusion_vae.runtime.errors import run_main  # noqa: E402
from guided_diffusion_vae.training.vae_training import train_vae, vae_train_defaults  # noqa: E402


def main(argv=None):
    defaults = vae_train_defaults()
    config = parse_with_config(defaults, argv, description=__doc__)
    train_vae({key: config[key] for key in defaults})


if __name__ == "__main__":
    sys.exit(run_main(main))
