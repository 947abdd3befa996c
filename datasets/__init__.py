"""Data-set generators for guided-diffusion-vae.

``datasets.microdoppler`` simulates radar micro-Doppler spectrograms of walking
people (one class per person) and writes them as ``user_XX/NNN.png`` image
folders that the project's image loaders read.

Import note: this package's name clashes with the HuggingFace ``datasets``
package when that one is installed. ``import datasets.microdoppler`` resolves to
this folder only when the repository root comes first on ``sys.path`` (for
example ``python -m`` from the repository root, or ``sys.path.insert(0, ROOT)``).
Code that must not depend on ``sys.path`` order should load the module from its
file path, as ``tests/test_microdoppler.py`` does::

    spec = importlib.util.spec_from_file_location("microdoppler", ROOT / "datasets/microdoppler.py")
    md = importlib.util.module_from_spec(spec); sys.modules["microdoppler"] = md
    spec.loader.exec_module(md)

Nothing is imported here on purpose, so ``import datasets`` stays cheap.
"""
