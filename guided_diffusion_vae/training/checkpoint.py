"""Self-describing, atomically written checkpoints.

Weights are safetensors files whose metadata carries everything needed to
rebuild the model (see docs/ARCHITECTURE.md): sampling needs only the file.
The original guided-diffusion's bare ``.pt`` state dicts still load (with
``weights_only=True``; nothing loaded here can execute code).
"""

import inspect
import json
import os
import re


import torch

from ..runtime.errors import UserError
from ..runtime.files import atomic_write_safetensors, atomic_write_torch

# The "kind" in the metadata of a noisy classifier for classifier guidance.
CLASSIFIER_KIND = "classifier"

META_KEY = "guided_diffusion_vae"
FORMAT_VERSION = 1


def save_weights(path, state_dict, metadata):
    """Store ``state_dict`` as safetensors with ``metadata`` (a JSON-able dict)."""
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state_dict.items()}
    header = {META_KEY: json.dumps({"format": FORMAT_VERSION, **metadata}, sort_keys=True)}
    return atomic_write_safetensors(path, tensors, header)


def read_metadata(path):
    """The metadata dict of a checkpoint of ours, or None for a bare state dict."""
    if not path.endswith(".safetensors"):
        return None
    from safetensors import safe_open

    _require_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types
        raise UserError(f"cannot read checkpoint {path}: {err}")
    return json.loads(header[META_KEY]) if META_KEY in header else None


def _require_file(path):
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")


def load_weights(path, data=None):
    """Return ``(state_dict, metadata_or_None)`` for a ``.safetensors`` file of
    ours or an original guided-diffusion ``.pt`` state dict.

    ``data`` may hold the file's bytes already (read once on rank 0 and
    broadcast); otherwise the file is read here.
    """
    if data is None:
        _require_file(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load, load_file

            state = load(data) if data is not None else load_file(path)
            meta = read_metadata(path) if data is None else _metadata_from_bytes(data)
            return state, meta
        import io

        source = io.BytesIO(data) if data is not None else path
        state = torch.load(source, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return state, None


def _metadata_from_bytes(data):
    # safetensors layout: 8-byte little-endian header length, then JSON header.
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    meta = header.get("__metadata__", {})
    return json.loads(meta[META_KEY]) if META_KEY in meta else None


def _explain_mismatch(missing, unexpected, wrong_shapes):
    """Hints from parameter names to the configuration values behind them."""
    names = set(missing) | set(unexpected) | {n for n, _, _ in wrong_shapes}
    hints = []
    if "label_emb.weight" in set(missing) | set(unexpected):
        hints.append("class_cond differs")
    elif "label_emb.weight" in names:
        hints.append("num_classes differs")
    if "input_blocks.0.0.weight" in names:
        hints.append("in_channels differs (pixels vs VAE latents?)")
    if any(n.startswith("out.") for n in names):
        hints.append("learn_sigma or in_channels differs")
    if "time_embed.0.weight" in names:
        hints.append("num_channels differs")
    if any(".qkv." in n or ".proj_out." in n for n in set(missing) | set(unexpected)):
        hints.append("attention_resolutions differ")
    if any(n.startswith(("input_blocks", "output_blocks")) for n in set(missing) | set(unexpected)):
        hints.append("num_res_blocks, channel_mult or resblock_updown differ")
    return hints


def load_state_strict(model, state_dict, source, checkpoint_config=None, model_config=None):
    """Load strictly; on any mismatch raise a UserError naming the missing,
    unexpected and wrongly shaped parameters and the config values that explain
    them. Never leaves a partly loaded model to be used silently."""
    check_state_fits(model, state_dict, source, checkpoint_config, model_config)
    model.load_state_dict(state_dict, strict=True)
    return model


def check_build_kwargs(factory, kwargs, source, key):
    """Refuse the stored arguments ``kwargs`` (metadata ``key`` of ``source``)
    unless ``factory`` accepts them all and lacks none it requires."""
    if not isinstance(kwargs, dict):
        raise UserError(f"{source}: metadata '{key}' must be an object of arguments, got {type(kwargs).__name__}")
    params = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise UserError(f"{source}: metadata '{key}' has unknown argument(s) {', '.join(map(str, unknown[:4]))}")
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs]
    if required:
        raise UserError(f"{source}: metadata '{key}' lacks the argument(s) {', '.join(required)}")


def _build(factory, kwargs, source, key):
    try:
        return factory(**kwargs)
    except UserError as err:
        raise UserError(f"{source}: metadata '{key}': {err}") from None
    except (TypeError, ValueError, KeyError, ZeroDivisionError, AssertionError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{source}: metadata '{key}' does not build a model: {first}") from None


def build_from_metadata(factory, kwargs, state_dict, source, key="model"):
    """``factory(**kwargs)`` holding ``state_dict``, built only once the
    stored tensors are known to fit: a skeleton on the meta device (no memory)
    is compared first, so metadata claiming e.g. ``num_channels: 4096`` beside
    small tensors is refused before a huge model is allocated."""
    check_build_kwargs(factory, kwargs, source, key)
    with torch.device("meta"):
        skeleton = _build(factory, kwargs, source, key)
    check_state_fits(skeleton, state_dict, source)
    del skeleton
    return load_state_strict(_build(factory, kwargs, source, key), state_dict, source)


def check_state_fits(model, state_dict, source, checkpoint_config=None, model_config=None):
    """Raise a UserError unless ``state_dict`` has exactly ``model``'s tensor
    names and shapes (``model`` may live on the meta device)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [
        (name, tuple(state_dict[name].shape), tuple(own[name].shape))
        for name in sorted(set(own) & set(state_dict))
        if tuple(state_dict[name].shape) != tuple(own[name].shape)
    ]
    if not (missing or unexpected or wrong):
        return

    def few(items):
        shown = ", ".join(items[:4])
        return shown + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {few(unexpected)}")
    if wrong:
        parts.append(
            f"{len(wrong)} wrongly shaped: "
            + few([f"{n} checkpoint {list(a)} vs model {list(b)}" for n, a, b in wrong])
        )
    reasons = []
    if checkpoint_config and model_config:
        diffs = [
            f"{k}={checkpoint_config.get(k)!r} in the checkpoint, {model_config.get(k)!r} here"
            for k in sorted(set(checkpoint_config) | set(model_config))
            if checkpoint_config.get(k) != model_config.get(k)
        ]
        reasons.extend(diffs)
    if not reasons:
        reasons = _explain_mismatch(missing, unexpected, wrong)
    why = f"; likely cause: {'; '.join(reasons)}" if reasons else ""
    raise UserError(f"{source} does not fit the model: {'; '.join(parts)}{why}")


def save_training_state(path, state):
    """Optimizer, loss scaler, step and random states; tensors, numbers,
    strings, lists, tuples and dicts only, so ``weights_only`` loading works."""
    return atomic_write_torch(path, state)


def load_training_state(path):
    _require_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read training state {path}: {str(err).splitlines()[0]}")


_STEP = re.compile(r"(\d+)\.(safetensors|pt)$")


def parse_step(path):
    """``.../model001200.safetensors`` -> 1200 (0 when the name has no step)."""
    found = _STEP.search(os.path.basename(path))
    return int(found.group(1)) if found else 0


def model_path(folder, step):
    return os.path.join(folder, f"model{step:06d}.safetensors")


def ema_path(folder, rate, step):
    return os.path.join(folder, f"ema_{rate}_{step:06d}.safetensors")


def state_path(folder, step):
    return os.path.join(folder, f"opt{step:06d}.pt")


_MODEL_NAME = re.compile(r"model(\d+)\.(safetensors|pt)")


def complete_model_files(folder):
    """The model files in ``folder`` (ours and the original's ``.pt``), oldest
    first, whose step is complete: its training state exists too. A save
    writes the model, each EMA and then the training state, each atomically,
    and pruning removes the training state first, so a save cut off by a kill
    never counts, for resume or for sampling."""
    if not os.path.isdir(folder):
        return []
    found = [name for name in os.listdir(folder)
             if (m := _MODEL_NAME.fullmatch(name)) and os.path.exists(state_path(folder, int(m.group(1))))]
    return sorted(found, key=parse_step)


def complete_steps(folder):
    """The steps of :func:`complete_model_files` saved by us (safetensors)."""
    return [parse_step(n) for n in complete_model_files(folder) if n.endswith(".safetensors")]


def latest_model_checkpoint(folder):
    """The newest complete ``modelNNNNNN.safetensors`` in ``folder``, or None."""
    steps = complete_steps(folder)
    return model_path(folder, steps[-1]) if steps else None


_EMA_NAME = re.compile(r"ema_[0-9.eE+-]+_(\d+)\.safetensors")


def is_ema_file(path):
    """Whether ``path`` is named as an EMA file (``ema_<rate>_<step>``, ours or the original's)."""
    return re.fullmatch(r"ema_[0-9.eE+-]+_\d+\.(safetensors|pt)", os.path.basename(path)) is not None


def prune_checkpoints(folder, keep, current_step):
    """Delete the model, EMA and training-state files of old steps, keeping
    the newest ``keep`` complete checkpoints up to ``current_step`` (the save
    just written, so always among them); ``keep`` 0 keeps everything.

    Steps after ``current_step`` are never touched: they are a torn save, or
    another run's, and resume may need them. Only our own names are pruned
    (``.pt`` checkpoints of the original stay). Within a step the training
    state goes first, so a crash mid-way leaves a step that no longer counts
    as resumable, and the next prune finishes it. Returns the steps removed.
    """
    if not keep or not os.path.isdir(folder):
        return []
    names = os.listdir(folder)
    steps = {parse_step(n) for n in names if re.fullmatch(r"model\d+\.safetensors", n)}
    steps |= {int(m.group(1)) for n in names if (m := _EMA_NAME.fullmatch(n))}
    steps = sorted(s for s in steps if s <= current_step)
    complete = [s for s in complete_steps(folder) if s <= current_step]
    kept = set(complete[-int(keep):])
    removed = [s for s in steps if s not in kept]
    for step in removed:
        emas = [n for n in names if (m := _EMA_NAME.fullmatch(n)) and int(m.group(1)) == step]
        for path in [state_path(folder, step), *(os.path.join(folder, n) for n in emas), model_path(folder, step)]:
            if os.path.exists(path):
                os.remove(path)
    return removed


def _newest_model_file(folder):
    """The model file of the newest complete step (``checkpoint.complete_steps``:
    a save cut off before its training state never counts); a folder without
    any training state (weights copied alone) stands for its newest model."""
    found = [n for n in os.listdir(folder) if re.fullmatch(r"model\d+\.(safetensors|pt)", n)]
    if not found:
        raise UserError(f"{folder} holds no modelNNNNNN.safetensors checkpoint")
    complete = complete_model_files(folder)
    if complete:
        return complete[-1]
    if any(re.fullmatch(r"opt\d+\.pt", n) for n in os.listdir(folder)):
        raise UserError(f"{folder}: no step has all its files (model, EMA and opt); the newest saves were cut off")
    return max(found, key=parse_step)


def newest_checkpoint(folder, use_ema):
    """The weights file a run folder stands for: its newest complete step
    (:func:`_newest_model_file`), the EMA with the largest rate (the slowest
    average) unless ``use_ema`` is False."""
    newest = _newest_model_file(folder)
    if not use_ema:
        return os.path.join(folder, newest)
    step, suffix = parse_step(newest), os.path.splitext(newest)[1]
    pattern = re.compile(rf"ema_([0-9.]+)_{step:06d}{re.escape(suffix)}")
    emas = [n for n in os.listdir(folder) if pattern.fullmatch(n)]
    if not emas:
        raise UserError(f"{folder}: no EMA weights for step {step} (ema_<rate>_{step:06d}{suffix}); "
                        f"pass --use_ema False to sample from {newest}")
    return os.path.join(folder, max(emas, key=lambda n: float(pattern.fullmatch(n).group(1))))


def resolve_weights_file(model_path, use_ema=True):
    """A file is taken as named; a folder means :func:`newest_checkpoint`."""
    if os.path.isdir(model_path):
        return newest_checkpoint(model_path, use_ema)
    if not os.path.isfile(model_path):
        raise UserError(f"checkpoint not found: {model_path}")
    return model_path
