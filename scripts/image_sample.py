"""Sample a pixel-space model: writes PNGs per class, a grid and the original's .npz.

    python scripts/image_sample.py --model_path runs/pixels --output_dir out --num_samples 16
"""

from guided_diffusion_vae.runtime.config import parse_with_config
from guided_diffusion_vae.runtime.errors import run_main
from guided_diffusion_vae.sampling.sample_from_checkpoint import run_sampling, sample_defaults


def main():
    run_sampling(parse_with_config(sample_defaults(), description=__doc__))


if __name__ == "__main__":
    run_main(main)
