"""Latent-space diffusion for radar micro-Doppler spectrograms, built on a
reimplementation of OpenAI's guided-diffusion core.

The folders follow the data path (docs/ARCHITECTURE.md): ``runtime`` (plumbing)
-> ``core`` (diffusion and UNet) -> ``simulate`` -> ``data`` -> ``latent`` (the
VAE boundary) -> ``training`` -> ``sampling`` -> ``evaluation`` -> ``report``
-> ``tools``. Each imports only folders before it.

The flat module names of earlier versions, which include guided-diffusion's own
(``guided_diffusion_vae.script_util``, ``.gaussian_diffusion``, ``.unet``,
``.train_util``, ...), still import: each is the moved module itself (the same
object), so code written for them keeps working, monkeypatching included.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"

# Old dotted name (under the package) -> where the module lives now.
MOVED_MODULES = {
    "errors": "runtime.errors", "files": "runtime.files", "dist_util": "runtime.dist_util",
    "logger": "runtime.logger", "progress": "runtime.progress", "flag_help": "runtime.flag_help",
    "config": "runtime.config", "images": "runtime.images", "cuda_graphs": "runtime.cuda_graphs",
    "gaussian_diffusion": "core.gaussian_diffusion", "respace": "core.respace", "resample": "core.resample",
    "losses": "core.losses", "nn": "core.nn", "unet": "core.unet", "fp16_util": "core.fp16_util",
    "script_util": "core.script_util", "samplers": "core.samplers", "sample_loop": "core.sample_loop",
    "array_datasets": "data.array_datasets", "image_datasets": "data.image_datasets", "labels": "data.labels",
    "batching": "data.batching",
    "vae_wrapper": "latent.vae_wrapper", "latent_datasets": "latent.latent_datasets",
    "train_util": "training.train_util", "training_parts": "training.training_parts", "ema": "training.ema",
    "checkpoint": "training.checkpoint", "augment": "training.augment",
    "diffusion_training": "training.diffusion_training", "latent_training": "training.latent_training",
    "vae_training": "training.vae_training", "classifier_training": "training.classifier_training",
    "evaluation.monitor_flags": "training.monitor_flags", "evaluation.classifier": "training.person_classifier",
    "sample_from_checkpoint": "sampling.sample_from_checkpoint", "guidance": "sampling.guidance",
    "sample_io": "sampling.sample_io",
    "quickstart": "tools.quickstart", "benchmark": "tools.benchmark", "diagnosis": "tools.diagnosis",
    "interpolation": "tools.interpolation",
    "evaluation.report": "report.html", "evaluation.spectrogram_figures": "report.spectrogram_figures",
    "evaluation.verdict": "report.verdict",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an import of an old module name with the moved module object."""

    def __init__(self):
        self._specs = {}

    def find_spec(self, fullname, path=None, target=None):
        old = fullname[len(__name__) + 1:] if fullname.startswith(__name__ + ".") else None
        if old not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{MOVED_MODULES[spec.name[len(__name__) + 1:]]}")
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        # The import system stamped the alias's spec on the module: give it its own back.
        module.__spec__ = self._specs.pop(module.__spec__.name, module.__spec__)


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
