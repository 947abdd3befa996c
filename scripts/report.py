"""One self-contained HTML page per run: metrics, loss curves, samples, configuration.

    python scripts/report.py --run_dir RUN [--eval_json eval/metrics.json] [--vae_dir VAE_DIR] \\
        [--read_dirs REAL_DIR,SAMPLES_DIR] [--output RUN/report.html]

Writes one HTML file with every picture embedded (open it anywhere, nothing else
needed) and the same figures as PNG files in <html stem>_files/ beside it. It
opens with the verdict (usable for augmentation or not, and why; also printed
at the end here), then shows the metrics of an evaluation JSON (scripts/evaluate.py) beside their
ceilings and floors, one row per person with the worst CAS marked, the training
loss by quartile of the diffusion timestep (progress.csv), real and generated
spectrograms of every person side by side, the generated samples closest to a
training image, and the run's configuration and VAE metrics. Inputs that are
missing leave a one-line note in their section. Only the folders given here
(run, evaluation JSON's, VAE, --read_dirs) are read: a folder the evaluation
JSON names elsewhere is left out with a note. See README.md, "Evaluation".
"""

import os
import sys

# Run from a checkout, the script uses that checkout's package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_vae.report.html import report_defaults, report_from_flags  # noqa: E402
from guided_diffusion_vae.runtime.config import parse_with_config  # noqa: E402
from guided_diffusion_vae.runtime.errors import run_main  # noqa: E402


def main(argv=None):
    report_from_flags(parse_with_config(report_defaults(), argv, description=__doc__))


if __name__ == "__main__":
    sys.exit(run_main(main))
