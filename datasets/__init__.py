"""The user-facing home of the built-in data set: its documentation
(``README.md``), the simulator's command line (``microdoppler.py``, a thin
wrapper) and the separability check (``separability.py``). The simulator
itself is ``guided_diffusion_vae.simulate``; import it from there (this
folder's name clashes with the HuggingFace ``datasets`` package).
"""
