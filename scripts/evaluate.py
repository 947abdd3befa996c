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

# Run from a checkout, the script uses that checkout's package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_vae.evaluation.evaluate import evaluate_defaults, evaluate_into_folder  # noqa: E402
from guided_diffusion_vae.runtime.config import parse_with_config  # noqa: E402
from guided_diffusion_vae.runtime.errors import run_main  # noqa: E402


def main(argv=None):
    evaluate_into_folder(parse_with_config(evaluate_defaults(), argv, description=__doc__))


if __name__ == "__main__":
    sys.exit(run_main(main))
