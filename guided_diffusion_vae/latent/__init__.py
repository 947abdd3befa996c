"""The VAE boundary: ``VAEInterface`` (encode where data enter, decode where
samples leave, the latent scale) and latent data sets and caches."""
