"""Training and sampling throughput, memory and FLOP utilisation of the
benchmark models (docs/BENCHMARKS.md).

    python scripts/benchmark.py --models latent16,latent32,pixel64 --modes reference,fast,default \\
        --samplers ddim,dpmpp_2m,unipc --repeat 5 --output_json bench.json
    python scripts/benchmark.py --device cpu --quick      # smoke run: checks it works, not speed
"""

import os
import sys

# Run from a checkout, the script uses that checkout's package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion_vae.runtime.config import parse_with_config  # noqa: E402
from guided_diffusion_vae.runtime.errors import run_main  # noqa: E402
from guided_diffusion_vae.tools.benchmark import FLAG_HELP, benchmark_defaults, run_benchmark  # noqa: E402


def main(argv=None):
    run_benchmark(parse_with_config(benchmark_defaults(), argv, description=__doc__, helps=FLAG_HELP))


if __name__ == "__main__":
    sys.exit(run_main(main))
