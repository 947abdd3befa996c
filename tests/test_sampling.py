"""Sampling: seeds independent of the batch size, latent clipping, sample files."""

import contextlib

import numpy as np
import pytest
import torch

from guided_diffusion_vae.core import script_util
from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.sampling.sample_io import save_samples
from guided_diffusion_vae.core.sample_loop import DenoisedClipper, generate_samples


@pytest.fixture(scope="module")
def model_and_diffusion():
    flags = script_util.model_and_diffusion_defaults()
    flags.update(
        image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
        diffusion_steps=100, timestep_respacing="10", in_channels=3, class_cond=True, num_classes=2,
        predict_xstart=True,  # bounded x0 predictions: graded, comparable pictures
    )
    torch.manual_seed(0)
    model, diffusion = script_util.create_model_and_diffusion(**flags)
    with torch.no_grad():  # zero-initialised outputs would make every sample pure noise
        for p in model.out.parameters():
            p.normal_(0, 0.05)
    return model.eval(), diffusion


@pytest.mark.parametrize("use_ddim,eta", [(True, 0.0), (False, 0.0), (True, 0.5)])
def test_same_seed_same_images_whatever_the_batch_size(model_and_diffusion, use_ddim, eta):
    model, diffusion = model_and_diffusion
    kw = dict(model=model, diffusion=diffusion, sample_shape=(3, 8, 8), num_samples=5,
              labels=[0, 1, 0, 1, 1], use_ddim=use_ddim, eta=eta, seed=7, progress=False)
    a, la, _ = generate_samples(batch_size=5, **kw)
    b, lb, _ = generate_samples(batch_size=2, **kw)
    assert a.shape == (5, 8, 8, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float rounding at most
    assert (a != b).mean() < 0.01
    np.testing.assert_array_equal(la, lb)
    assert a.std() > 1.0 and ((a == 255) | (a == 0)).mean() < 0.5  # graded, not saturated
    c, _, _ = generate_samples(batch_size=5, **{**kw, "seed": 8})
    assert (a != c).mean() > 0.3  # another seed, other images


def test_clipper_modes_and_counts():
    x = torch.tensor([[[[-5.0, -2.0, 0.5, 4.0]]]])
    fixed = DenoisedClipper("fixed", clip_range=3.0)
    assert fixed(x).flatten().tolist() == [-3.0, -2.0, 0.5, 3.0]
    assert fixed.fraction() == pytest.approx(0.5)
    assert torch.equal(DenoisedClipper("none")(x), x)
    assert DenoisedClipper("pixel")(x).abs().max() == 1.0
    dyn = DenoisedClipper("dynamic", clip_range=1.0, percentile=0.5)
    out = dyn(x)
    limit = torch.quantile(x.abs().flatten(), 0.5)
    assert out.abs().max() == pytest.approx(limit.item())
    with pytest.raises(UserError, match="clip_denoised 'clamp'"):
        DenoisedClipper("clamp")


def test_save_samples_writes_per_class_pngs_grid_and_npz(tmp_path):
    from PIL import Image

    images = np.random.default_rng(0).integers(0, 255, (4, 8, 8, 1), dtype=np.uint8)
    paths = save_samples(str(tmp_path), images, np.array([1, 1, 0, 1]), {"0": "user_01", "1": "user_02"})
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [
        "grid.png", "user_01/generated_000.png", "user_02/generated_000.png",
        "user_02/generated_001.png", "user_02/generated_002.png",
    ]
    img = np.array(Image.open(tmp_path / "user_02" / "generated_001.png"))
    np.testing.assert_array_equal(img, images[1][..., 0])
    with np.load(paths["npz"]) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["arr_1"], [1, 1, 0, 1])


def _pixel_checkpoint(path, label_map, nan=False, awake=False):
    """A 2-class 8x8 pixel checkpoint of ours whose label map is ``label_map``
    (``awake``: a non-zero output layer, so samples are not all grey)."""
    from guided_diffusion_vae.training.checkpoint import save_weights
    from guided_diffusion_vae.core.script_util import split_flags

    flags = script_util.model_and_diffusion_defaults()
    flags.update(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
                 diffusion_steps=40, in_channels=3, class_cond=True, num_classes=2, predict_xstart=True)
    torch.manual_seed(0)
    model = script_util.create_model(**split_flags(flags)[0])
    if awake:
        with torch.no_grad():
            for p in model.out.parameters():
                p.normal_(0, 0.05)
    state = model.state_dict()
    if nan:
        state["out.2.weight"] = torch.full_like(state["out.2.weight"], float("nan"))
    model_config, diffusion_config = split_flags(flags)
    save_weights(str(path), state, {"step": 0, "weights": "model", "model": model_config,
                                    "diffusion": diffusion_config, "vae": None,
                                    "data": {"image_size": 8, "label_map": label_map}, "train": {}})
    return str(path)


def _sample_config(model_path, output_dir, **kw):
    from guided_diffusion_vae.sampling.sample_from_checkpoint import sample_defaults

    return {**sample_defaults(), "model_path": model_path, "output_dir": str(output_dir), "use_ema": False,
            "num_images_per_user": 2, "batch_size": 4, "timestep_respacing": "5", "use_ddim": True,
            "device": "cpu", **kw}


def test_label_map_names_never_leave_the_output_folder(tmp_path):
    """A checkpoint sent by someone else names its classes '../../..' and '/abs':
    samples still land inside --output_dir, the readable names in classes.json."""
    import json

    from guided_diffusion_vae.sampling.sample_from_checkpoint import run_sampling

    evil = {"0": "../../../escaped", "1": str(tmp_path / "abs_target")}
    ckpt = _pixel_checkpoint(tmp_path / "model000000.safetensors", evil)
    out = tmp_path / "deep" / "out"
    run_sampling(_sample_config(ckpt, out))
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".png")
    assert written and all(out in p.parents for p in written)
    assert not (tmp_path / "abs_target").exists() and not list(tmp_path.parent.glob("escaped"))
    classes = json.loads((out / "classes.json").read_text())
    assert sorted(classes.values()) == sorted(evil.values())
    assert all("/" not in folder and not folder.startswith(".") for folder in classes)
    # Two names that sanitise alike keep two folders.
    save_samples(str(tmp_path / "twin"), np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 1]), {"0": "a/b", "1": "a_b"})
    assert sorted(p.name for p in (tmp_path / "twin").iterdir() if p.is_dir()) == ["a_b", "a_b_"]


def test_nonfinite_samples_fail_and_write_nothing(tmp_path):
    from guided_diffusion_vae.sampling.sample_from_checkpoint import run_sampling

    ckpt = _pixel_checkpoint(tmp_path / "model000000.safetensors", {"0": "user_01", "1": "user_02"}, nan=True)
    with pytest.raises(UserError, match=r"4 sample\(s\) \(0, 1, 2, 3\) hold NaN or Inf.*model000000"):
        run_sampling(_sample_config(ckpt, tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))
    with pytest.raises(UserError, match="every sample held NaN"):
        run_sampling(_sample_config(ckpt, tmp_path / "out", keep_going=True))
    with pytest.raises(UserError, match="classifier_scale must be a finite number"):
        run_sampling(_sample_config(ckpt, tmp_path / "out", classifier_scale=float("nan")))


def test_keep_going_drops_only_the_bad_samples(model_and_diffusion):
    model, diffusion = model_and_diffusion
    dropped = []

    def poison(x):  # a decoder that fails on the second sample only
        x = x.clone()
        x[1] = float("inf")
        return x

    images, labels, _ = generate_samples(model=model, diffusion=diffusion, sample_shape=(3, 8, 8), num_samples=3,
                                         batch_size=3, labels=[0, 1, 0], use_ddim=True, decode_fn=poison,
                                         progress=False, on_nonfinite=dropped.extend)
    assert dropped == [1] and images.shape[0] == 2 and labels.tolist() == [0, 0]


def test_sampling_pipeline_resolves_once_and_draws_any_share(tmp_path):
    """build_pipeline settles sampler, respacing, classes and clipping from the
    checkpoint and the flags; a share drawn alone equals the same samples
    drawn in the whole set, and record() says how they were drawn."""
    from guided_diffusion_vae.sampling.sample_from_checkpoint import build_pipeline

    ckpt = _pixel_checkpoint(tmp_path / "model000000.safetensors", {"0": "user_01", "1": "user_02"}, awake=True)
    config = _sample_config(ckpt, tmp_path / "out", num_images_per_user=3, seed=7)
    pipeline = build_pipeline(config, "ddim", torch.device("cpu"))
    assert pipeline.diffusion.num_timesteps == 5 and pipeline.steps is None  # "5" respaced for ddim
    assert pipeline.sample_shape == (3, 8, 8) and pipeline.num_samples == 6
    assert pipeline.labels.tolist() == [0, 0, 0, 1, 1, 1] and pipeline.clipper.mode == "pixel"
    assert pipeline.describe() == "sampler ddim, 5 steps, 6 samples"
    whole, labels, _ = pipeline.draw(0, 6, batch_size=4, seed=7, progress=False)
    share, share_labels, _ = pipeline.draw(2, 5, batch_size=2, seed=7, progress=False)
    assert whole.shape == (6, 8, 8, 3) and whole.std() > 0
    np.testing.assert_array_equal(share, whole[2:5])
    np.testing.assert_array_equal(share_labels, labels[2:5])
    record = pipeline.record(7, 6)
    assert {k: record[k] for k in ("model", "step", "sampler", "steps", "timestep_respacing", "eta", "seed",
                                   "samples", "clip_denoised", "precision")} == {
        "model": ckpt, "step": 0, "sampler": "ddim", "steps": 5, "timestep_respacing": "5", "eta": 0.0,
        "seed": 7, "samples": 6, "clip_denoised": "pixel", "precision": "fp32"}
    assert record["guidance"] == {"kind": "none"} and record["timestep_spacing"] is None
    # The diffusers samplers take the step count and the whole diffusion.
    dpm = build_pipeline({**config, "sampler": "dpmpp_2m", "use_ddim": False}, "dpmpp_2m", torch.device("cpu"))
    assert dpm.steps == 5 and dpm.diffusion.num_timesteps == 40 and dpm.spacing == "trailing"
    assert dpm.describe() == "sampler dpmpp_2m, 5 steps spaced trailing, 6 samples"


def test_out_of_gpu_memory_names_the_batch_size_and_writes_nothing(tmp_path, monkeypatch):
    from guided_diffusion_vae.sampling import sample_from_checkpoint as sampling

    def too_big(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(sampling.SamplingPipeline, "draw", too_big)
    ckpt = _pixel_checkpoint(tmp_path / "model000000.safetensors", {"0": "user_01", "1": "user_02"})
    with pytest.raises(UserError, match=r"^batch_size 4: out of GPU memory while sampling; nothing was written"):
        sampling.run_sampling(_sample_config(ckpt, tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_the_vae_script_samples_in_batches_that_keep_a_gpu_busy():
    from guided_diffusion_vae.sampling.sample_from_checkpoint import latent_sample_defaults, sample_defaults

    assert sample_defaults()["batch_size"] == 16  # the original's image_sample.py
    assert latent_sample_defaults()["batch_size"] == 256


def test_sampling_precision_auto_is_bf16_on_a_gpu_and_float32_on_the_cpu(monkeypatch):
    from guided_diffusion_vae.core.sample_loop import resolve_sampling_precision

    assert resolve_sampling_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_sampling_precision("auto", "cuda:0") == "bf16"  # a device name needs no GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_sampling_precision("auto", "cuda:0") == "fp32"
    assert resolve_sampling_precision("fp32", "cuda:0") == "fp32"
    assert resolve_sampling_precision("bf16", "cpu") == "bf16"  # asked for: as asked
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_sampling_precision("fp16", "cpu")


def test_the_norm_kernels_are_built_ahead_once_per_model_and_call(model_and_diffusion, monkeypatch):
    """generate_samples records and builds the fused norms' kernels before a
    model's first call only: later calls of the same kind (the next share, a
    smaller batch) skip the recording forward pass; another precision
    records again."""
    from guided_diffusion_vae.core import sample_loop

    model, diffusion = model_and_diffusion
    recorded = []

    def build(forward, device, backward=True):
        forward()  # the real recording pass, on the CPU with eager norms
        recorded.append(backward)
    monkeypatch.setattr(sample_loop, "build_norm_kernels_ahead", build)
    monkeypatch.setattr(sample_loop, "_KERNELS_BUILT", __import__("weakref").WeakKeyDictionary())
    kw = dict(model=model, diffusion=diffusion, sample_shape=(3, 8, 8), labels=[0, 1], use_ddim=True,
              seed=7, progress=False)
    generate_samples(num_samples=2, batch_size=2, **kw)
    assert recorded == [False]  # forward kernels only: sampling runs no backward pass
    generate_samples(num_samples=2, batch_size=1, **kw)
    generate_samples(num_samples=2, batch_size=2, first_index=2, **kw)
    assert len(recorded) == 1
    generate_samples(num_samples=2, batch_size=2, precision="bf16", **kw)
    assert len(recorded) == 2


def test_bf16_sampling_holds_the_weights_in_bf16_with_the_same_numbers(model_and_diffusion, monkeypatch):
    """A bf16 draw runs the convolutions and linear layers on weights cast to
    bf16 once (autocast would cast them at every call), gives the very same
    samples as autocast's own casts, and afterwards every parameter is again
    the float32 tensor it was; guidance wrappers name their networks."""
    from guided_diffusion_vae.core import sample_loop
    from guided_diffusion_vae.sampling.guidance import classifier_free_model

    model, diffusion = model_and_diffusion
    before = {name: (p.data, p.data.data_ptr(), p.dtype) for name, p in model.named_parameters()}
    seen = []
    hook = model.input_blocks[0][0].register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.dtype))
    kw = dict(diffusion=diffusion, sample_shape=(3, 8, 8), num_samples=3, batch_size=3, labels=[0, 1, 0],
              use_ddim=True, seed=3, progress=False, precision="bf16")
    try:
        held, _, _ = generate_samples(model=model, **kw)
        assert seen and set(seen) == {torch.bfloat16}
        seen.clear()
        monkeypatch.setattr(sample_loop, "weights_cast_for_autocast", lambda modules, dtype: contextlib.nullcontext())
        cast_by_autocast, _, _ = generate_samples(model=model, **kw)
        assert set(seen) == {torch.float32}
    finally:
        hook.remove()
    np.testing.assert_array_equal(held, cast_by_autocast)
    for name, p in model.named_parameters():
        data, ptr, dtype = before[name]
        assert p.data is data or p.data.data_ptr() == ptr, name
        assert p.dtype == dtype == torch.float32, name
    guided = classifier_free_model(model, null_label=1, scale=2.0, out_channels=3)
    assert sample_loop.networks_of(guided) == (model,)
    assert sample_loop.networks_of(model) == (model,) and sample_loop.networks_of(lambda x, t: x) == ()


def _graphs_on_the_cpu(monkeypatch):
    """CUDA graphs stood in for on the CPU (as in tests/test_cuda_graphs.py):
    warm-up = a plain call, capture = remember the function, replay = call it
    again on the captured input tensors, into the captured output. A step that
    read anything but its tensor arguments would replay the first batch's."""
    from guided_diffusion_vae.core import sample_loop
    from guided_diffusion_vae.runtime import cuda_graphs

    def capture(self, fn):
        output = fn()

        class Graph:
            def replay(graph):
                output.copy_(fn())

        return Graph(), output

    monkeypatch.setattr(cuda_graphs.ReplayedStep, "_on_side_stream", staticmethod(lambda fn: fn()))
    monkeypatch.setattr(cuda_graphs.ReplayedStep, "_capture", capture)
    monkeypatch.setattr(cuda_graphs.GraphedCall, "device_type", "cpu")
    monkeypatch.setattr(cuda_graphs.torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(sample_loop, "graphs_usable", lambda device: True)
    made = []

    class Recorded(cuda_graphs.GraphCache):
        def __call__(self, name, fn):
            made.append(name)
            return super().__call__(name, fn)

    monkeypatch.setattr(sample_loop, "GraphCache", Recorded)
    return made


@pytest.mark.parametrize("sampler,eta,clip", [("ddim", 0.0, "none"), ("ddpm", 0.0, "none"), ("ddim", 0.5, "none"),
                                              ("ddim", 0.0, "fixed"), ("dpmpp_2m", 0.0, "none")])
def test_replayed_steps_give_the_samples_of_plain_calls(model_and_diffusion, monkeypatch, sampler, eta, clip):
    """On a GPU the core samplers replay their whole step from a CUDA graph
    (the model call alone where clipping keeps count, as the diffusers
    samplers do); later batches replay the graphs of the first, with their own
    labels and noise. The samples and the clipped share are those of plain calls."""
    model, diffusion = model_and_diffusion
    kw = dict(model=model, diffusion=diffusion, sample_shape=(3, 8, 8), num_samples=7, batch_size=3,
              labels=[0, 1, 1, 0, 1, 0, 0], sampler=sampler, eta=eta, seed=3, progress=False, as_float=True)
    plain, labels, plain_clipped = generate_samples(cuda_graphs=False, clipper=DenoisedClipper(clip, 0.1), **kw)
    made = _graphs_on_the_cpu(monkeypatch)
    replayed, replayed_labels, replayed_clipped = generate_samples(cuda_graphs=True, clipper=DenoisedClipper(clip, 0.1),
                                                                    **kw)
    expected = sampler if clip == "none" and sampler in ("ddim", "ddpm") else "model"
    assert set(made) == {expected} and len(made) == 3  # one name, asked for by each of the three batches
    np.testing.assert_array_equal(replayed, plain)
    np.testing.assert_array_equal(replayed_labels, labels)
    assert replayed_clipped == plain_clipped and (clip == "none") == (plain_clipped == 0)
