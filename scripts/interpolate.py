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

from guided_diffusion_vae.config import parse_with_config
from guided_diffusion_vae.errors import run_main
from guided_diffusion_vae.interpolation import interpolate_defaults, run_interpolation
from guided_diffusion_vae.script_util import model_and_diffusion_defaults

HELPS = {
    "model_path": "a checkpoint file (sampled exactly as named) or a run folder (its newest step)",
    "output_dir": "folder for frame_NNN.png, strip.png and interpolation.gif",
    "use_ema": "for a run folder: the EMA weights with the largest rate (False: the raw weights)",
    "seed_a": "seed of the first frame (the noise of sample 0 of this --seed)",
    "seed_b": "seed of the last frame",
    "user_a": "conditional models: the person of the first frame, a name or the number in it (default: the first)",
    "user_b": "conditional models: the person of the last frame (default: --user_a)",
    "steps": "number of frames, both endpoints included (>= 2)",
    "timestep_respacing": "DDIM steps, as the sampling scripts take it (ddim25 becomes 25 when the "
                          "checkpoint's diffusion steps are no multiple of 25)",
    "batch_size": "frames denoised together (the two endpoints are always denoised alone)",
    "clip_denoised": "clipping of each predicted x0: auto (pixel for pixel models, none for latents), "
                     "none, pixel, fixed, dynamic",
    "clip_range": "limit of the fixed and dynamic clipping",
    "dynamic_threshold_percentile": "percentile of |x0| used by dynamic clipping",
    "device": "auto (GPU if there is one), cpu, cuda, cuda:N",
    "precision": "fp32 or bf16 (autocast)",
    "vae_path": "the VAE of a latent checkpoint, if it has moved from where the checkpoint says",
    "gif_ms": "milliseconds per GIF frame",
}
for _flag in model_and_diffusion_defaults():
    HELPS.setdefault(_flag, "model flag, read only for a bare .pt state dict (ours carry their own)")


def main(argv=None):
    run_interpolation(parse_with_config(interpolate_defaults(), argv, description=__doc__, helps=HELPS))


if __name__ == "__main__":
    run_main(main)
