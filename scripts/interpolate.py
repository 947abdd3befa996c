"""Walk between two samples: slerp between two seeds' starting noises (and, for
conditional models, a linear mix of two people's class embeddings), decoded
deterministically with DDIM (eta 0).

    python scripts/interpolate.py --model_path RUN_DIR_OR_CKPT --seed_a 1 --seed_b 2 \\
        --user_a user_01 --user_b user_05 --steps 16 --output_dir out

Writes out/frame_000.png ... frame_015.png, out/strip.png (the frames in one row)
and out/interpolation.gif. The first frame is the sample that
`image_sample_vae.py --seed 1 --sampler ddim --num_images_per_user 1 --user_ids user_01`
draws with the same --timestep_respacing; the last one likewise for seed_b/user_b.
"""

import os
import sys

# Run from a checkout, the script uses that checkout's package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_vae.runtime.config import parse_with_config  # noqa: E402
from guided_diffusion_vae.runtime.errors import run_main  # noqa: E402
from guided_diffusion_vae.tools.interpolation import interpolate_defaults, run_interpolation  # noqa: E402


def main(argv=None):
    run_interpolation(parse_with_config(interpolate_defaults(), argv, description=__doc__))


if __name__ == "__main__":
    sys.exit(run_main(main))
