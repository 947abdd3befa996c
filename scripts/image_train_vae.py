"""Train a class-conditional diffusion model in the latent space of your VAE.

    mpiexec -n 2 python scripts/image_train_vae.py --config configs/microdoppler_small.yaml \\
        --latent_cache CACHE_DIR            # or: --data_dir IMAGES --vae_path VAE_DIR

Every guided-diffusion model, diffusion and training flag works here; image_size
is in pixels and the network is built for the VAE's latent size.
"""

from guided_diffusion_vae.runtime.config import parse_with_config
from guided_diffusion_vae.runtime.errors import run_main
from guided_diffusion_vae.evaluation.monitor import build_monitor
from guided_diffusion_vae.training.latent_training import latent_train_defaults, latent_training_data
from guided_diffusion_vae.training.diffusion_training import run_training


def main():
    config = parse_with_config(latent_train_defaults(), description=__doc__)
    run_training(config, latent_training_data, build_monitor)


if __name__ == "__main__":
    run_main(main)
