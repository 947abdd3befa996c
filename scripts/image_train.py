"""Train a pixel-space diffusion model on a folder of images (guided-diffusion's flags).

    mpiexec -n 2 python scripts/image_train.py --data_dir IMAGES --image_size 64 \\
        --num_channels 64 --class_cond True --lr_anneal_steps 1000 --log_dir runs/pixels
"""

from guided_diffusion_vae.runtime.config import parse_with_config
from guided_diffusion_vae.runtime.errors import run_main
from guided_diffusion_vae.evaluation.monitor import build_monitor
from guided_diffusion_vae.training.diffusion_training import pixel_train_defaults, pixel_training_data, run_training


def main():
    config = parse_with_config(pixel_train_defaults(), description=__doc__)
    run_training(config, pixel_training_data, build_monitor)


if __name__ == "__main__":
    run_main(main)
