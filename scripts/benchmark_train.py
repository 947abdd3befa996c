"""Images/s of the training step for a config, on synthetic latents.

    python scripts/benchmark_train.py --config configs/microdoppler_small.yaml \\
        --variants fp32,bf16,bf16+compile --output_json bench.json
"""

from guided_diffusion_vae.benchmark import benchmark_defaults, run_benchmark
from guided_diffusion_vae.config import parse_with_config
from guided_diffusion_vae.errors import run_main


def main():
    run_benchmark(parse_with_config(benchmark_defaults(), description=__doc__))


if __name__ == "__main__":
    run_main(main)
