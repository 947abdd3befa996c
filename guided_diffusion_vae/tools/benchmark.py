"""Throughput of training and sampling for the benchmark models (``scripts/benchmark.py``).

Training is timed through the real ``TrainLoop`` step (network, loss,
backward, clipping, fused AdamW, EMA, on-device metrics) on synthetic data
already on the device, so the figure isolates the diffusion step from data
loading and the VAE. Sampling is timed through ``sample_loop.generate_samples``,
the function the sampling scripts use. FLOPs come from
``torch.utils.flop_counter``; utilisation is FLOPs per second over the GPU's
dense bf16 peak.
"""

import contextlib
import copy
import gc
import json
import os
import statistics
import time

import torch

from ..runtime import dist_util
from ..core import script_util
from ..runtime.errors import UserError
from ..runtime.files import atomic_write_json, check_writable_file
from ..core.sample_loop import generate_samples, resolve_sampling_precision
from ..core import triton_norm
from ..core.nn import channels_last, fused_norm, to_fast_layout
from ..core.samplers import SAMPLER_NAMES
from ..training.train_util import TrainLoop
from ..training.training_parts import compile_module

# The guided-diffusion UNet configurations of the performance issue (31
# classes, learned sigmas, scale-shift norm, resblock up/down, 64-wide heads).
BENCH_MODELS = {
    "latent16": {"image_size": 16, "in_channels": 4, "channel_mult": "1,2,2",
                 "attention_resolutions": "8,4", "batch_size": 256},
    "latent32": {"image_size": 32, "in_channels": 4, "channel_mult": "1,2,2,2",
                 "attention_resolutions": "16,8,4", "batch_size": 128},
    "pixel64": {"image_size": 64, "in_channels": 3, "channel_mult": "1,2,3,4",
                "attention_resolutions": "32,16,8", "batch_size": 64},
}
COMMON_MODEL_FLAGS = {"num_channels": 128, "num_res_blocks": 2, "learn_sigma": True, "class_cond": True,
                      "num_classes": 31, "use_scale_shift_norm": True, "resblock_updown": True,
                      "num_head_channels": 64, "diffusion_steps": 1000, "noise_schedule": "linear"}
# --quick: the same shapes of code, small enough for a CPU smoke run.
QUICK_MODEL_FLAGS = {"image_size": 8, "num_channels": 32, "channel_mult": "1,2", "attention_resolutions": "4",
                     "num_head_channels": 16, "num_res_blocks": 1, "batch_size": 4}

# precision, torch.compile, CUDA graphs, attention kernel, fused GroupNorm
# kernels (False: eager ops; else nn.FUSED_KERNELS), cuDNN autotuning (True,
# False, or "sampling" only, as the scripts do), channels-last weights and
# activations (None: nn.to_fast_layout's own choice), and the precision of
# sampling when it differs from training's.
_FAST = {"precision": "bf16", "compile": False, "cuda_graph": True, "plain_attention": False,
         "fused_norm": False, "cudnn_benchmark": False, "channels_last": False, "sampling_precision": None}
MODES = {
    "reference": {**_FAST, "precision": "fp32", "cuda_graph": False, "plain_attention": True},
    "fast": _FAST,
    "fast+compile": {**_FAST, "compile": True},
    # Candidates for the default, not yet measured on a GPU: GroupNorm+SiLU
    # fused by hand-written Triton kernels (core/triton_norm) or by
    # torch.compile of the eager ops alone (core/nn.norm_act), and cuDNN's
    # autotuner picking the convolution algorithms for the fixed shapes.
    "fast+triton": {**_FAST, "fused_norm": "triton"},
    "fast+fused": {**_FAST, "fused_norm": "compile"},
    "fast+cudnn": {**_FAST, "cudnn_benchmark": True},
    "fast+triton+cudnn": {**_FAST, "fused_norm": "triton", "cudnn_benchmark": True},
    # The fused kernels read channels-last activations, so cuDNN needs no
    # layout conversions around its convolutions.
    "fast+triton+cl": {**_FAST, "fused_norm": "triton", "channels_last": True},
    "fast+triton+cudnn+cl": {**_FAST, "fused_norm": "triton", "cudnn_benchmark": True, "channels_last": True},
    # What the scripts do when given no flags: image_train_vae.py's training
    # (bf16), image_sample_vae.py's sampling (precision auto: bf16 on a GPU;
    # cuDNN's autotuner), the fused norms and layout where the device allows.
    "default": {**_FAST, "fused_norm": "triton", "cudnn_benchmark": "sampling", "channels_last": None,
                "sampling_precision": "auto"},
}


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; the
# first name found in the device name wins.
BF16_PEAKS = (("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12))


def benchmark_defaults():
    return {
        "models": "latent16",
        "modes": "reference,default",
        "samplers": "ddim,dpmpp_2m",
        "sampling_steps": 50,
        "sampling_batch": 256,
        "sampling_batches": 1,
        "train_batch": 0,
        "warmup_steps": 10,
        "timed_steps": 30,
        "repeat": 5,
        "loss_check_steps": 0,
        "vae_sizes": "small,base",
        "vae_batch": 256,
        "device": "auto",
        "quick": False,
        "profile_dir": "",
        "output_json": "",
        **dist_util.threads_defaults(),
    }


FLAG_HELP = {
    "models": f"comma list of benchmark models: {', '.join(BENCH_MODELS)}",
    "modes": f"comma list of modes: {', '.join(MODES)} (reference: fp32, eager, math attention; fast: bf16 "
             "and CUDA graphs with the norms as separate ops; +compile: torch.compile; +triton / +fused: "
             "GroupNorm+SiLU fused by hand-written Triton kernels / by torch.compile; +cudnn: cuDNN's autotuner; "
             "+cl: channels-last weights and activations; default: what the scripts do with no flags, their "
             "sampling precision included)",
    "samplers": f"comma list of samplers to time ({', '.join(SAMPLER_NAMES)}); empty: no sampling",
    "sampling_steps": "sampler steps per sample (DDIM-50 is ddim with 50)",
    "sampling_batch": "samples per batch when timing sampling",
    "sampling_batches": "batches each timed sampling call draws, as a sampling script draws its whole share in "
                        "one call: each call warms up and captures the model's graph once, so more batches show "
                        "the rate of a long draw; 1 (the default) keeps the figures comparable with earlier ones",
    "train_batch": "training batch size; 0: the model's own (256, 128, 64)",
    "warmup_steps": "untimed training steps first (compilation, graph capture, cuDNN autotuning)",
    "timed_steps": "training steps per timed window",
    "repeat": "timed windows (training) and calls (sampling); the median and spread are reported",
    "loss_check_steps": "if > 0, train reference and each other mode this many steps from the same start "
                        "and compare the loss curves",
    "vae_sizes": "comma list of VAE presets (tiny, small, base) whose encode/decode img/s of 64x64 images "
                 "to time (bf16 autocast on GPU, as VAEInterface runs them); empty: none",
    "vae_batch": "images per batch when timing the VAE",
    "device": dist_util.DEVICE_HELP,
    "quick": "tiny model, few steps: a smoke run that checks the benchmark works, not speed",
    "profile_dir": "if set, write torch.profiler tables there: each mode's training step, and its model "
                   "call at the sampling batch",
    "output_json": "write every setting and result to this JSON file",
}


def _split(text):
    return [part.strip() for part in str(text).split(",") if part.strip()]


def check_benchmark_config(config):
    for name in _split(config["models"]):
        if name not in BENCH_MODELS:
            raise UserError(f"models: unknown model {name!r}; choose from {', '.join(BENCH_MODELS)}")
    for name in _split(config["modes"]):
        if name not in MODES:
            raise UserError(f"modes: unknown mode {name!r}; choose from {', '.join(MODES)}")
    for name in _split(config["samplers"]):
        if name not in SAMPLER_NAMES:
            raise UserError(f"samplers: unknown sampler {name!r}; choose from {', '.join(SAMPLER_NAMES)}")
    for key in ("sampling_steps", "sampling_batch", "sampling_batches", "timed_steps", "repeat"):
        if int(config[key]) < 1:
            raise UserError(f"{key} must be at least 1, got {config[key]}")
    for key in ("train_batch", "warmup_steps", "loss_check_steps"):
        if int(config[key]) < 0:
            raise UserError(f"{key} must be 0 or more, got {config[key]}")


def model_flags(name, quick=False):
    """The full ``create_model_and_diffusion`` flags of benchmark model ``name``
    and its training batch size."""
    flags = {**script_util.model_and_diffusion_defaults(), **COMMON_MODEL_FLAGS, **BENCH_MODELS[name]}
    if quick:
        flags.update(QUICK_MODEL_FLAGS)
    batch = flags.pop("batch_size")
    return flags, batch


def bf16_peak(device):
    """The dense bf16 peak of ``device`` in FLOP/s, or None when unknown (CPU too)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAKS if key in name), None)


@contextlib.contextmanager
def _mode_kernels(mode, stage):
    """The mode's attention kernel, GroupNorm+SiLU kernels (``nn.fused_norm``),
    memory layout (``nn.channels_last``) and cuDNN autotuning for ``stage``
    ("train" or "sample"), restored afterwards."""
    before = torch.backends.cudnn.benchmark
    autotune = MODES[mode]["cudnn_benchmark"]
    torch.backends.cudnn.benchmark = autotune is True or (autotune == "sampling" and stage == "sample")
    try:
        kernels = MODES[mode]["fused_norm"]
        with fused_norm(None, kernels) if kernels else fused_norm(False), channels_last(MODES[mode]["channels_last"]):
            if MODES[mode]["plain_attention"]:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.MATH):
                    yield
            else:
                yield
    finally:
        torch.backends.cudnn.benchmark = before


def _sampling_precision(mode, device):
    """"fp32" or "bf16": the mode's sampling precision (its training one
    unless it says otherwise) as run on ``device``."""
    settings = MODES[mode]
    return resolve_sampling_precision(settings["sampling_precision"] or settings["precision"], device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def count_flops(model, diffusion, flags, device, batch=2):
    """FLOPs per image of one training step (forward + backward of the loss)
    and of one model call in sampling, counted on a small batch."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = (batch, flags["in_channels"], flags["image_size"], flags["image_size"])
    x = torch.randn(shape, device=device)
    y = torch.randint(0, flags["num_classes"], (batch,), device=device)
    t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
    model = copy.deepcopy(model).to(device)
    with fused_norm(False), FlopCounterMode(display=False) as counter:
        diffusion.training_losses(model, x, t, model_kwargs={"y": y})["loss"].mean().backward()
    train = counter.get_total_flops() / batch
    with fused_norm(False), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y=y)
    return train, counter.get_total_flops() / batch


def _synthetic_batches(batch, flags, device):
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, flags["in_channels"], flags["image_size"], flags["image_size"])
    while True:
        # New tensors each step, as a data loader gives (same values: cheap).
        latents = torch.randn(shape, generator=gen, device=device)
        labels = torch.randint(0, flags["num_classes"], (batch,), generator=gen, device=device)
        yield latents, {"y": labels}


def _loop(flags, batch, mode, device, seed=0):
    torch.manual_seed(seed)
    model, diffusion = script_util.create_model_and_diffusion(**flags)
    settings = MODES[mode]
    autotune = torch.backends.cudnn.benchmark  # the mode's (_mode_kernels), over the trainer's own choice
    loop = TrainLoop(model=model, diffusion=diffusion, data=_synthetic_batches(batch, flags, device),
                     batch_size=batch, lr=1e-4, ema_rate="0.9999", log_interval=10**9, save_interval=0,
                     precision=settings["precision"], compile=settings["compile"],
                     cuda_graph=settings["cuda_graph"], checkpoint_dir=os.devnull)
    torch.backends.cudnn.benchmark = autotune
    return loop


def _steps(loop, n):
    for _ in range(n):
        batch, cond = next(loop.data)
        loop.run_step(batch, cond)
        loop.step += 1


def time_training(flags, batch, mode, device, config):
    """Images/s of training steps (median over ``repeat`` windows), warm-up
    time and peak memory."""
    if device.type == "cuda":
        gc.collect()  # an earlier mode's loop and graphs, held in reference cycles, would count
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with _mode_kernels(mode, "train"):
        loop = _loop(flags, batch, mode, device)
        start = time.perf_counter()
        _steps(loop, max(int(config["warmup_steps"]), 3))  # 3: graph warm-up and capture
        _sync(device)
        warmup_s = time.perf_counter() - start
        rates = []
        for _ in range(int(config["repeat"])):
            start = time.perf_counter()
            _steps(loop, int(config["timed_steps"]))
            _sync(device)
            rates.append(batch * int(config["timed_steps"]) / (time.perf_counter() - start))
        if config["profile_dir"]:
            _profile(loop, mode, device, config["profile_dir"])
        losses = loop.metrics.pop()
    if not all(map(lambda v: v == v, losses.values())):
        raise RuntimeError(f"{mode}: non-finite training metrics {losses}")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"images_per_s": _spread(rates), "warmup_s": warmup_s, "peak_memory_GiB": peak,
            "loss": losses.get("loss")}


def _profile(loop, mode, device, folder):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _steps(loop, 5)
        _sync(device)
    _write_profile(prof, device, folder, f"train_{mode.replace('+', '_')}.txt")


def _write_profile(prof, device, folder, name):
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40))


def _profile_model_call(model, flags, mode, device, batch, folder):
    """A torch.profiler table of three eager model calls at the sampling batch
    (a graph replay would show one launch, not its kernels)."""
    from torch.profiler import ProfilerActivity, profile

    shape = (batch, flags["in_channels"], flags["image_size"], flags["image_size"])
    x = torch.randn(shape, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, flags["num_classes"], (batch,), device=device)
    precision = _sampling_precision(mode, device)
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), cast:
        model(x, t, y=y)  # warm: compile and cuDNN choices stay out of the table
        _sync(device)
        with profile(activities=activities) as prof:
            for _ in range(3):
                model(x, t, y=y)
            _sync(device)
    _write_profile(prof, device, folder, f"model_call_{mode.replace('+', '_')}.txt")


def time_sampling(model, flags, mode, sampler, device, config):
    """Images/s of ``sampler`` at ``sampling_steps`` through ``generate_samples``
    (median over ``repeat`` calls of ``sampling_batches`` batches each, after
    one warm-up call), and the model calls per sample."""
    steps = int(config["sampling_steps"])
    core = sampler in ("ddpm", "ddim")
    diffusion = script_util.create_gaussian_diffusion(
        **{**script_util.diffusion_kwargs(flags), "timestep_respacing": f"ddim{steps}" if core else ""})
    batch = int(config["sampling_batch"])
    count = batch * int(config["sampling_batches"])  # samples a timed call draws
    calls = {"n": 0}
    settings = MODES[mode]
    precision = _sampling_precision(mode, device)
    network = {"now": model}

    def counted(x, t, **kwargs):
        calls["n"] += not triton_norm.recording()  # the kernels' build-ahead call is no sampling step
        return network["now"](x, t, **kwargs)

    counted.networks = (model,)  # as the scripts' model, its weights held in bf16 for bf16 sampling
    run = dict(model=counted, diffusion=diffusion, sample_shape=(flags["in_channels"], flags["image_size"],
               flags["image_size"]), num_samples=count, batch_size=batch,
               labels=[i % flags["num_classes"] for i in range(count)], sampler=sampler,
               steps=None if core else steps, device=device, precision=precision, progress=False,
               cuda_graphs=settings["cuda_graph"])
    rates = []
    with _mode_kernels(mode, "sample"):
        # The mode's layout, from whatever an earlier mode left.
        to_fast_layout(model.to(memory_format=torch.contiguous_format), device)
        # Calls per sample, counted on one eager sample (a graph replay calls nothing).
        generate_samples(**{**run, "num_samples": 1, "batch_size": 1, "labels": [0], "cuda_graphs": False}, seed=0)
        calls_per_sample = calls["n"]
        network["now"] = compile_module(model) if settings["compile"] else model
        generate_samples(**run, seed=0)  # warm-up: cuDNN choices, graph capture
        for r in range(int(config["repeat"])):
            _sync(device)
            start = time.perf_counter()
            generate_samples(**run, seed=r + 1)
            _sync(device)
            rates.append(count / (time.perf_counter() - start))
        if config["profile_dir"] and sampler == _split(config["samplers"])[0]:  # the same call for every sampler
            _profile_model_call(network["now"], flags, mode, device, batch, config["profile_dir"])
    return {"images_per_s": _spread(rates), "model_calls_per_sample": calls_per_sample}


def time_vae(size, device, config, image_size=64):
    """Images/s of encoding (posterior mean) and decoding 64x64x3 images with
    the AutoencoderKL preset ``size`` (median over ``repeat`` batches)."""
    from ..training.vae_training import build_autoencoder, resolve_architecture

    arch = resolve_architecture({"vae_size": size, "latent_channels": 4, "image_size": image_size}, 3)
    vae = build_autoencoder(arch).to(device).eval()
    batch = int(config["vae_batch"])
    images = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
    cast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    result = {}
    with torch.no_grad(), cast:
        latents = vae.encode(images).latent_dist.mean
        for name, fn in (("encode", lambda: vae.encode(images).latent_dist.mean),
                         ("decode", lambda: vae.decode(latents).sample)):
            fn()
            rates = []
            for _ in range(int(config["repeat"])):
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                rates.append(batch / (time.perf_counter() - start))
            result[name] = _spread(rates)
    return {"vae": size, "params_M": sum(p.numel() for p in vae.parameters()) / 1e6, **result}


def loss_curves(flags, batch, modes, device, steps):
    """Train every mode ``steps`` steps from the same weights and data; the
    mean loss of each fifth of the run, per mode."""
    curves = {}
    for mode in modes:
        with _mode_kernels(mode, "train"):
            loop = _loop(flags, batch, mode, device, seed=1)
            points = []
            for _ in range(5):
                _steps(loop, max(1, steps // 5))
                points.append(loop.metrics.pop()["loss"])
        curves[mode] = points
    return curves


def run_benchmark(config):
    """Run every model x mode, print a table, write JSON; returns the result dict."""
    check_benchmark_config(config)
    if config["output_json"]:  # before the work, not after it
        check_writable_file(config["output_json"], "output_json")
    if config["quick"]:
        config = {**config, "warmup_steps": min(int(config["warmup_steps"]), 2), "timed_steps": 2,
                  "repeat": min(int(config["repeat"]), 2), "sampling_steps": 2, "sampling_batch": 4,
                  "loss_check_steps": min(int(config["loss_check_steps"]), 10), "vae_batch": 2,
                  "vae_sizes": "tiny" if _split(config["vae_sizes"]) else ""}
    device = dist_util.pick_device(config["device"])
    dist_util.set_threads(config["threads"], print)
    peak = bf16_peak(device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "bf16_peak_flops": peak, "date": time.strftime("%Y-%m-%d"),
            "settings": dict(config)}
    print(json.dumps({k: v for k, v in info.items() if k != "settings"}), flush=True)
    results = []
    for name in _split(config["models"]):
        flags, batch = model_flags(name, config["quick"])
        batch = int(config["train_batch"]) or batch
        torch.manual_seed(0)
        model, diffusion = script_util.create_model_and_diffusion(**flags)
        train_flops, call_flops = count_flops(model, diffusion, flags, device)
        model.to(device).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for mode in _split(config["modes"]):
            row = {"model": name, "mode": mode, "params_M": params, "train_batch": batch,
                   "train_gflops_per_image": train_flops / 1e9, "call_gflops_per_image": call_flops / 1e9}
            row["train"] = time_training(flags, batch, mode, device, config)
            if peak:
                row["train"]["utilisation"] = row["train"]["images_per_s"]["median"] * train_flops / peak
            row["sampling"] = {}
            for sampler in _split(config["samplers"]):
                timing = time_sampling(model, flags, mode, sampler, device, config)
                if peak:
                    timing["utilisation"] = (timing["images_per_s"]["median"] * timing["model_calls_per_sample"]
                                             * call_flops / peak)
                row["sampling"][sampler] = timing
            print(json.dumps(row), flush=True)
            results.append(row)
        if int(config["loss_check_steps"]) and len(_split(config["modes"])) > 1:
            curves = loss_curves(flags, batch, _split(config["modes"]), device, int(config["loss_check_steps"]))
            results.append({"model": name, "loss_curves": curves})
            print(json.dumps(results[-1]), flush=True)
    for size in _split(config["vae_sizes"]):
        results.append(time_vae(size, device, config))
        print(json.dumps(results[-1]), flush=True)
    print(format_table(results), flush=True)
    report = {"info": info, "results": results}
    if config["output_json"]:

        atomic_write_json(config["output_json"], report, sort_keys=False)
    return report


def format_table(results):
    """A Markdown table of the timing rows of ``results``."""
    samplers = sorted({s for row in results for s in row.get("sampling", {})})
    head = ["model", "mode", "train img/s (min-max)", "util.", "peak GiB", "warm-up s"] + [
        f"{s} img/s" for s in samplers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results:
        if "train" not in row:
            continue
        train = row["train"]
        rate = train["images_per_s"]
        cells = [row["model"], row["mode"], f"{rate['median']:,.0f} ({rate['min']:,.0f}-{rate['max']:,.0f})",
                 f"{train['utilisation']:.1%}" if "utilisation" in train else "-",
                 f"{train['peak_memory_GiB']:.2f}" if train["peak_memory_GiB"] is not None else "-",
                 f"{train['warmup_s']:.1f}"]
        for s in samplers:
            timing = row["sampling"].get(s)
            cells.append(f"{timing['images_per_s']['median']:,.0f}" if timing else "-")
        lines.append("| " + " | ".join(cells) + " |")
    vaes = [row for row in results if "vae" in row]
    if vaes:
        lines += ["", "| VAE | params M | encode img/s | decode img/s |", "|---|---|---|---|"]
        lines += [f"| {r['vae']} | {r['params_M']:.1f} | {r['encode']['median']:,.0f} | {r['decode']['median']:,.0f} |"
                  for r in vaes]
    return "\n".join(lines)
