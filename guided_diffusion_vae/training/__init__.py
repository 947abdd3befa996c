"""Training loops and what they save: the diffusion trainer (``train_util``,
``diffusion_training``, ``latent_training``), the VAE and classifier
trainers, EMA, augmentation, the self-describing checkpoint, and the
reference person classifier the VAE's identity check and the evaluation share."""
