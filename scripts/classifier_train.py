"""Train a classifier of noisy latents for classifier guidance per person.

    mpiexec -n 2 python scripts/classifier_train.py --latent_cache CACHE_DIR --image_size 64 \\
        --model_path RUN_DIR --log_dir CLS_RUN

--model_path names the diffusion model to guide: the classifier learns its
noise schedule (without it, give that model's schedule flags).

image_size is in pixels (the cache's); the network is built for the VAE's
latent size. Checkpoints: CLS_RUN/classifierNNNNNN.safetensors, loaded with
guided_diffusion_vae.training.classifier_training.load_classifier.
"""

from guided_diffusion_vae.training.classifier_training import classifier_train_defaults, train_classifier
from guided_diffusion_vae.runtime.config import parse_with_config
from guided_diffusion_vae.runtime.errors import run_main


def main():
    config = parse_with_config(classifier_train_defaults(), description=__doc__)
    train_classifier(config)


if __name__ == "__main__":
    run_main(main)
