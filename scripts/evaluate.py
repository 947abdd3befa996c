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

from guided_diffusion_vae.runtime import errors


def main(argv=None):
    from guided_diffusion_vae.runtime import logger
    from guided_diffusion_vae.runtime.files import undone_on_failure
    from guided_diffusion_vae.runtime.config import parse_with_config
    from guided_diffusion_vae.evaluation.evaluate import check_evaluation_config, evaluate_defaults, run_evaluation

    defaults = evaluate_defaults()
    config = parse_with_config(defaults, argv, description=__doc__)
    check_evaluation_config({key: config[key] for key in defaults})  # before the log folder exists
    folder = os.path.dirname(os.path.abspath(config["output_json"]))  # required: checked above
    # An evaluation that fails (unreadable samples, a bad classifier) leaves
    # nothing of its own beside the JSON, not even log.txt.
    with undone_on_failure(folder, before_undo=logger.close):
        logger.configure(dir=folder, format_strs="stdout,log")
        run_evaluation({key: config[key] for key in defaults})


if __name__ == "__main__":
    errors.run_main(main)
