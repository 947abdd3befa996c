"""The benchmark script runs the real training step and reports figures."""

import json

from guided_diffusion_vae.benchmark import benchmark_defaults, run_benchmark


def test_benchmark_reports_throughput(tmp_path):
    config = {**benchmark_defaults(), "image_size": 16, "num_channels": 32, "channel_mult": "1,2",
              "attention_resolutions": "2", "num_head_channels": 16, "batch_size": 2, "class_cond": True,
              "warmup_steps": 1, "timed_steps": 2, "variants": "fp32", "output_json": str(tmp_path / "b.json"),
              "num_classes_data": 3}
    results = run_benchmark(config)
    assert results[0]["variant"] == "fp32" and results[0]["images_per_sec"] > 0
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["info"]["device"] == "cpu" and saved["results"][0]["ms_per_step"] > 0
