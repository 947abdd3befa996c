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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_vae.runtime import errors
from guided_diffusion_vae.report.html import report_defaults


def default_output(config):
    if config["output"]:
        return config["output"]
    if config["run_dir"]:
        return os.path.join(config["run_dir"], "report.html")
    if config["eval_json"]:
        return os.path.join(os.path.dirname(os.path.abspath(config["eval_json"])), "report.html")
    return ""


def main(argv=None):
    from guided_diffusion_vae.runtime.config import parse_with_config
    from guided_diffusion_vae.report.html import write_report
    from guided_diffusion_vae.report.verdict import verdict_text
    from guided_diffusion_vae.runtime.files import read_json_object

    defaults = report_defaults()
    config = parse_with_config(defaults, argv, description=__doc__)
    if not config["run_dir"] and not config["eval_json"]:
        raise errors.UserError("nothing to report: give --run_dir, --eval_json or both")
    path = write_report(default_output(config), eval_json=config["eval_json"] or None,
                        run_dir=config["run_dir"] or None, vae_dir=config["vae_dir"] or None,
                        title=config["title"], people=config["people"] or None, per_person=config["per_person"],
                        read_dirs=config["read_dirs"])
    print(f"wrote {path}")
    if config["eval_json"]:
        print(verdict_text(read_json_object(config["eval_json"])))
    return path


if __name__ == "__main__":
    errors.run_main(main)
