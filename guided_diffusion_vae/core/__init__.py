"""The diffusion maths and networks of guided-diffusion, under its public names
(gaussian_diffusion, respace, resample, losses, nn, unet, fp16_util,
script_util), and the samplers that walk a model's steps (samplers,
sample_loop). Does not know whether it runs on pixels or latents."""
