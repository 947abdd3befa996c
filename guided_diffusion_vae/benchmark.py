"""Training-step throughput of the real TrainLoop on synthetic latents.

Measures images/s, milliseconds per step and peak GPU memory for a config
(``--config configs/microdoppler_small.yaml``) without a VAE or data set, so
the figure isolates the diffusion step (network, loss, backward, optimizer,
EMA, metric accumulation).
"""

import json
import time

import torch

from . import dist_util, logger, script_util
from .diffusion_training import TrainingData, model_flags
from .latent_training import latent_train_defaults
from .train_util import TrainLoop
from .vae_wrapper import latent_shape_of


def benchmark_defaults():
    return {
        **latent_train_defaults(),
        "latent_channels": 4,
        "downsample_factor": 4,
        "num_classes_data": 31,
        "warmup_steps": 15,
        "timed_steps": 40,
        "variants": "fp32,bf16,bf16+compile",
        "output_json": "",
        "check_syncs": True,
    }


# The steps are timed on synthetic latents: of the training flags only these matter.
_USED = (*script_util.model_and_diffusion_defaults(), "batch_size", "lr", "ema_rate", "grad_clip", "threads")
FLAG_HELP = {
    **{flag: "not used by the benchmark (it times --variants on synthetic latents)"
       for flag in latent_train_defaults() if flag not in _USED},
    "latent_channels": "channels of the synthetic latents (the VAE's latent channels they stand for)",
    "downsample_factor": "pixels per latent along each side (the VAE's), so image_size gives the latent size",
    "num_classes_data": "classes of the synthetic labels",
    "warmup_steps": "untimed steps first (compilation, autotuning)",
    "timed_steps": "timed steps per variant",
    "variants": "comma-separated variants to time: fp32 or bf16, each optionally with +compile",
    "output_json": "also write the figures to this JSON file ('' = none)",
    "check_syncs": "on a GPU, count host-device synchronisations per step (variants without compile)",
}


def _synthetic_stream(batch_size, shape, num_classes, device):
    gen = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn((batch_size, *shape), generator=gen, device=device)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen, device=device)
    while True:
        yield latents, {"y": labels}


def _time_variant(config, variant, device):
    precision = "bf16" if "bf16" in variant else "fp32"
    compile_model = "compile" in variant
    shape = latent_shape_of(config, config["image_size"])
    label_map = {str(i): f"user_{i + 1:02d}" for i in range(config["num_classes_data"])}
    data = TrainingData(batches=None, label_map=label_map, image_size=config["image_size"],
                        image_channels=3, sample_shape=shape)
    torch.manual_seed(0)
    model, diffusion = script_util.create_model_and_diffusion(**model_flags(config, data))
    loop = TrainLoop(
        model=model, diffusion=diffusion,
        data=_synthetic_stream(config["batch_size"], shape, config["num_classes_data"], device),
        batch_size=config["batch_size"], lr=config["lr"], ema_rate=config["ema_rate"],
        log_interval=10**9, save_interval=0, precision=precision, compile=compile_model,
        grad_clip=config["grad_clip"], checkpoint_dir="/tmp",
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def steps(n):
        for _ in range(n):
            batch, cond = next(loop.data)
            loop.run_step(batch, cond)
            loop.step += 1

    t0 = time.perf_counter()
    steps(config["warmup_steps"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps(config["timed_steps"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    syncs = None
    if config["check_syncs"] and device.type == "cuda" and not compile_model:
        # Count host-device synchronisations inside training steps (CUDA's
        # sync debug mode warns on each one).
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                steps(5)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sync_lines = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        syncs = {"per_5_steps": len(sync_lines), "examples": sorted(set(sync_lines))[:5]}
    loop.metrics.pop()  # the accumulated metrics are read once, as a log would
    result = {
        "variant": variant,
        "images_per_sec": config["batch_size"] * config["timed_steps"] / elapsed,
        "ms_per_step": 1000 * elapsed / config["timed_steps"],
        "warmup_s": warm,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "host_syncs": syncs,
    }
    return result


def run_benchmark(config):
    dist_util.setup_dist()
    dist_util.set_threads(config["threads"], logger.log)
    device = dist_util.dev()
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "batch_size": config["batch_size"], "config": config.get("config")}
    logger.log(json.dumps(info))
    results = []
    for variant in [v.strip() for v in config["variants"].split(",") if v.strip()]:
        result = _time_variant(config, variant, device)
        logger.log(json.dumps(result))
        results.append(result)
    if config["output_json"]:
        with open(config["output_json"], "w") as f:
            json.dump({"info": info, "results": results}, f, indent=2)
    return results
