"""Train a classifier of noisy latents for classifier guidance per person.

    mpiexec -n 2 python scripts/classifier_train.py --latent_cache CACHE_DIR --image_size 64 \\
        --model_path RUN_DIR --log_dir CLS_RUN

--model_path names the diffusion model to guide: the classifier learns its
noise schedule (without it, give that model's schedule flags).

image_size is in pixels (the cache's); the network is built for the VAE's
latent size. Checkpoints: CLS_RUN/classifierNNNNNN.safetensors, loaded with
guided_diffusion_vae.training.classifier_training.load_classifier.
"""

import os
import sys

# Run from a checkout, the script uses that checkout's package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_vae.runtime.config import parse_with_config  # noqa: E402
from guided_diffusion_vae.runtime.errors import run_main  # noqa: E402
from guided_diffusion_vae.training.classifier_training import classifier_train_defaults, train_classifier  # noqa: E402


def main(argv=None):
    train_classifier(parse_with_config(classifier_train_defaults(), argv, description=__doc__))


if __name__ == "__main__":
    sys.exit(run_main(main))
