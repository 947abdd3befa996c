"""scripts/benchmark.py: the CPU smoke run the issue asks for (it asserts
nothing about speed), and fast mode training like reference mode."""

import json
import os
import runpy

import pytest

from guided_diffusion_vae.tools.benchmark import benchmark_defaults, loss_curves, model_flags, run_benchmark
from guided_diffusion_vae.runtime.errors import UserError

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "benchmark.py")


def test_quick_cpu_run_reports_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    runpy.run_path(SCRIPT, run_name="benchmark")["main"](["--device", "cpu", "--quick", "--samplers", "ddim,dpmpp_2m",
                                                          "--output_json", str(out), "--profile_dir", str(tmp_path / "prof")])
    report = json.loads(out.read_text())
    assert report["info"]["device"] == "cpu" and report["info"]["torch"]
    rows = [r for r in report["results"] if "train" in r]
    assert [r["mode"] for r in rows] == ["reference", "default"]  # the default modes: what the scripts do
    for row in rows:
        assert row["train"]["images_per_s"]["median"] > 0 and len(row["train"]["images_per_s"]["runs"]) == 2
        assert row["train_gflops_per_image"] > row["call_gflops_per_image"] > 0  # backward costs more
        assert set(row["sampling"]) == {"ddim", "dpmpp_2m"}
        assert row["sampling"]["ddim"]["model_calls_per_sample"] == 2  # --quick: 2 steps
    vae = [r for r in report["results"] if "vae" in r]
    assert vae and vae[0]["encode"]["median"] > 0 and vae[0]["decode"]["median"] > 0
    table = capsys.readouterr().out
    assert "| latent16 | reference |" in table and "| tiny |" in table
    # The profiles: each mode's training step and its model call, as kernel/op tables.
    tables = {p.name: p.read_text() for p in (tmp_path / "prof").iterdir()}
    assert set(tables) == {"train_reference.txt", "train_default.txt", "model_call_reference.txt",
                           "model_call_default.txt"}
    assert "aten::convolution" in tables["model_call_default.txt"] and "aten::group_norm" in tables["model_call_default.txt"]


def test_fast_mode_follows_the_reference_loss_curve():
    flags, _ = model_flags("latent16", quick=True)
    curves = loss_curves(flags, 8, ["reference", "fast"], __import__("torch").device("cpu"), 30)
    reference, fast = curves["reference"], curves["fast"]
    assert reference[-1] < reference[0]  # it learns
    for r, f in zip(reference, fast):
        assert abs(f - r) <= 0.05 * r, curves


def test_unknown_mode_is_refused():
    with pytest.raises(UserError, match="modes: unknown mode 'turbo'"):
        run_benchmark({**benchmark_defaults(), "modes": "reference,turbo", "device": "cpu"})


def test_each_mode_sets_its_kernels_and_restores_them():
    """fast+cudnn turns cuDNN's autotuner on only while it runs; fast+triton
    and fast+fused route GroupNorm+SiLU through their fused kernels (on CUDA)
    only while they run; +cl stores weights channels-last; default autotunes
    sampling only, as the scripts do."""
    import torch

    from guided_diffusion_vae.core import nn
    from guided_diffusion_vae.sampling.sample_from_checkpoint import sample_defaults
    from guided_diffusion_vae.tools.benchmark import MODES, _mode_kernels

    modes = ("fast", "fast+cudnn", "fast+fused", "fast+triton", "fast+triton+cudnn", "fast+triton+cl", "default")
    assert set(modes) <= set(MODES)
    before = torch.backends.cudnn.benchmark
    seen = {}
    for mode in modes:
        for stage in ("train", "sample"):
            with _mode_kernels(mode, stage):
                seen[mode, stage] = (torch.backends.cudnn.benchmark, nn._FUSED["enabled"], nn._FUSED["kernels"],
                                     nn._CHANNELS_LAST["enabled"])
            assert torch.backends.cudnn.benchmark == before
            assert (nn._FUSED["enabled"], nn._FUSED["kernels"]) == (None, "triton")  # the default, restored
            assert nn._CHANNELS_LAST["enabled"] is None
    expected = {"fast": (False, False, "triton", False), "fast+cudnn": (True, False, "triton", False),
                "fast+fused": (False, None, "compile", False), "fast+triton": (False, None, "triton", False),
                "fast+triton+cudnn": (True, None, "triton", False), "fast+triton+cl": (False, None, "triton", True)}
    for mode, kernels in expected.items():
        assert seen[mode, "train"] == seen[mode, "sample"] == kernels, mode
    assert seen["default", "train"] == (False, None, "triton", None)
    assert seen["default", "sample"] == (True, None, "triton", None)
    assert MODES["default"]["sampling_precision"] == sample_defaults()["precision"] == "auto"  # the scripts' own


def test_sampling_can_be_timed_over_several_batches_a_call(monkeypatch):
    """--sampling_batches draws that many batches in each timed call of
    generate_samples (one warm-up and graph capture a call, as a sampling
    script's whole share); the rate counts every sample drawn."""
    import torch

    from guided_diffusion_vae.core import script_util
    from guided_diffusion_vae.tools import benchmark

    calls = []
    real = benchmark.generate_samples

    def recorded(**kwargs):
        calls.append((kwargs["num_samples"], kwargs["batch_size"], len(kwargs["labels"])))
        return real(**kwargs)
    monkeypatch.setattr(benchmark, "generate_samples", recorded)
    flags, _ = model_flags("latent16", quick=True)
    torch.manual_seed(0)
    model, _ = script_util.create_model_and_diffusion(**flags)
    config = {**benchmark_defaults(), "sampling_steps": 2, "sampling_batch": 3, "sampling_batches": 2, "repeat": 2}
    timing = benchmark.time_sampling(model.eval(), flags, "reference", "ddim", torch.device("cpu"), config)
    assert calls[0] == (1, 1, 1)  # the eager call that counts model calls per sample
    assert calls[1:] == [(6, 3, 6)] * 3  # the warm-up call and two timed ones: two batches of 3 each
    assert len(timing["images_per_s"]["runs"]) == 2 and timing["images_per_s"]["median"] > 0
    with pytest.raises(UserError, match="sampling_batches must be at least 1, got 0"):
        run_benchmark({**benchmark_defaults(), "sampling_batches": 0, "device": "cpu"})
