"""Why are my samples noise? Checks a checkpoint, its VAE and a few real images.

    python scripts/diagnose.py --model_path RUN_DIR_OR_CKPT [--vae_path VAE_DIR] [--data_dir IMAGES] \\
        [--output_json diagnosis.json]

Runs a short DDIM (a few samples) and prints per step the min/max/std of x_t and
of the predicted x0, then one line per check (OK / WARN / FAIL / SKIP):

  sampling       blow-up of the latents (x_t std > 3, |x0| > 10 at low noise)
  clipping       share of predicted x0 values each --clip_denoised mode would clip
  nan_inf        NaN/Inf in the weights, or the first sampling step where it appears
  ema            the EMA's age (share still its starting weights) and distance to the raw weights
  vae_match      the VAE found has the checkpoint's fingerprint and shape
  vae_roundtrip  RMS of the VAE's reconstruction of --data_dir images (needs --data_dir)
  latent_scale   whether the stored scale gives unit-std latents on --data_dir (needs --data_dir)

and a diagnosis in words: the most likely cause and what to do. The rules are in
guided_diffusion_vae/tools/diagnosis.py. Exit codes: 0 no check failed (warnings
allowed), 3 a check failed, 2 the diagnosis could not run (a bad path or flag).
"""

import os
import sys

# Run from a checkout, the script uses that checkout's package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_vae.runtime.config import parse_with_config  # noqa: E402
from guided_diffusion_vae.runtime.errors import run_main  # noqa: E402
from guided_diffusion_vae.tools.diagnosis import diagnose_and_print, diagnose_defaults  # noqa: E402


def main(argv=None):
    return diagnose_and_print(parse_with_config(diagnose_defaults(), argv, description=__doc__))


if __name__ == "__main__":
    sys.exit(run_main(main))
