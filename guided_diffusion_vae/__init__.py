"""Latent-space diffusion for radar micro-Doppler spectrograms, built on a
reimplementation of OpenAI's guided-diffusion core."""

__version__ = "0.1.0"
