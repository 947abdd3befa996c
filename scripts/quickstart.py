"""The whole job end to end on the built-in micro-Doppler simulator.

    python scripts/quickstart.py --preset tiny --run_dir runs/quickstart   # 2-core CPU, < 15 min
    python scripts/quickstart.py --preset gpu  --run_dir runs/gpu          # one GPU, full config

Stages: data -> vae -> latents -> diffusion -> samples -> report (run_dir/report.html).
A rerun skips finished stages and resumes the interrupted one.
"""

from guided_diffusion_vae.config import parse_with_config
from guided_diffusion_vae.errors import run_main
from guided_diffusion_vae.quickstart import quickstart_defaults, run_quickstart


def main():
    run_quickstart(parse_with_config(quickstart_defaults(), description=__doc__))


if __name__ == "__main__":
    run_main(main)
