"""Do generated spectrograms show the right person? Identity and distribution metrics.

    python scripts/evaluate.py --real_train DATA/train --real_test DATA/test \\
        --generated SAMPLES_DIR_OR_NPZ --output_json eval/metrics.json [--vae_path VAE_DIR]

Trains a reference person classifier on --real_train (or loads --classifier_path)
and reports TRTR (its held-out accuracy: the ceiling), CAS, rCAS, TSTR, the
augmentation gain, the Frechet distance in its feature space beside the
real-vs-real floor, precision/recall and memorised samples. Writes the JSON,
nearest_pairs.png and reference_classifier.safetensors beside it, and prints a
table. Runs on the GPU when there is one. See README.md, "Evaluation".
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_vae import errors  # noqa: E402

HELPS = {
    "real_train": "folder of real training images, one sub-folder per person (the reference classifier learns these)",
    "real_test": "folder of real held-out images of the same people (never seen by any classifier)",
    "generated": "generated samples: a folder written by the sampling scripts (PERSON/*.png) or their .npz",
    "output_json": "where the metrics JSON goes; nearest_pairs.png and the classifier are written beside it",
    "vae_path": "a diffusers AutoencoderKL folder: adds rCAS, the accuracy on its reconstructions of --real_test",
    "classifier_path": "load this reference classifier (a .safetensors written by an earlier run) instead of training one",
    "save_classifier": "where a newly trained reference classifier is saved ('' = beside --output_json)",
    "image_size": "evaluate at this square size (0 = the size of the real training images); others are resized",
    "device": "auto (GPU if there is one), cpu, cuda, cuda:N",
    "seed": "seed of every classifier and random subset",
    "classifier_steps": "optimizer steps of every classifier trained (reference, TSTR, augmentation)",
    "classifier_batch_size": "classifier training batch size",
    "classifier_lr": "classifier peak learning rate (one-cycle schedule, AdamW)",
    "classifier_width": "channels of the classifier's first conv block (x2, x4 after)",
    "classifier_embed_dim": "size of the classifier embedding used for the Frechet distance and precision/recall",
    "augment_k": "comma-separated real images per person for the augmentation-gain experiment",
    "augment_generated": "generated images per person added in the augmentation-gain experiment",
    "pr_k": "k of the k-nearest-neighbour manifolds of precision and recall",
    "memorisation_threshold": "flag a sample whose nearest-training distance is below this share of the typical "
                              "real held-out one",
    "num_pairs": "closest generated/training pairs shown in nearest_pairs.png",
    "inception_weights": "optional: Inception weights file on disk for FID/KID via torch-fidelity (never downloaded)",
}


def main(argv=None):
    from guided_diffusion_vae import logger
    from guided_diffusion_vae.config import parse_with_config
    from guided_diffusion_vae.evaluation.evaluate import check_evaluation_config, evaluate_defaults, run_evaluation

    defaults = evaluate_defaults()
    config = parse_with_config(defaults, argv, description=__doc__, helps=HELPS)
    check_evaluation_config({key: config[key] for key in defaults})  # before the log folder exists
    logger.configure(dir=os.path.dirname(os.path.abspath(config["output_json"])) if config["output_json"] else None,
                     format_strs="stdout,log")
    run_evaluation({key: config[key] for key in defaults})


if __name__ == "__main__":
    errors.run_main(main)
