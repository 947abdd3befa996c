"""Train a pixel-space diffusion model on a folder of images (guided-diffusion's flags).

    mpiexec -n 2 python scripts/image_train.py --data_dir IMAGES --image_size 64 \\
        --num_channels 64 --class_cond True --lr_anneal_steps 1000 --log_dir runs/pixels
"""

import os
import sys

# Run from a checkout, the script uses that checkout's package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_vae.evaluation.monitor import build_monitor  # noqa: E402
from guided_diffusion_vae.runtime.config import parse_with_config  # noqa: E402
from guided_diffusion_vae.runtime.errors import run_main  # noqa: E402
from guided_diffusion_vae.training.diffusion_training import (  # noqa: E402
    pixel_train_defaults, pixel_training_data, run_training)


def main(argv=None):
    run_training(parse_with_config(pixel_train_defaults(), argv, description=__doc__), pixel_training_data,
                 build_monitor)


if __name__ == "__main__":
    sys.exit(run_main(main))
