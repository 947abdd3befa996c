"""The one-command quickstart: every stage, its outputs, the report, and a
rerun that skips finished stages."""

import json
import os
import re

import pytest

from guided_diffusion_vae import logger

from guided_diffusion_vae.quickstart import STAGES, quickstart_defaults, run_quickstart

SMOKE = {
    "num_users": 3, "train_per_user": 8, "test_per_user": 4, "image_size": 32,
    "vae": {"vae_size": "tiny", "lr_anneal_steps": 3, "batch_size": 4, "lr": 1e-3,
            "log_interval": 1, "save_interval": 2, "progress": False},
    "diffusion": {"num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2", "attention_resolutions": "4",
                  "num_head_channels": 16, "batch_size": 4, "lr_anneal_steps": 3, "ema_rate": "0.99",
                  "log_interval": 1, "save_interval": 2, "sample_interval": 0, "compile": False,
                  "num_workers": 0, "diffusion_steps": 100},
    "sampling": {"num_images_per_user": 2, "timestep_respacing": "ddim5", "batch_size": 8},
    "evaluate": {"classifier_steps": 20, "classifier_embed_dim": 8, "augment_k": "2", "augment_generated": 2},
}


@pytest.fixture
def printed(capsys):
    """capsys; afterwards no logger is left writing to its closed stream."""
    default = logger.Logger.DEFAULT
    yield capsys
    logger.close()
    logger.Logger.CURRENT = logger.Logger.DEFAULT = default


def test_quickstart_runs_every_stage_and_resumes(tmp_path, printed):
    config = {**quickstart_defaults(), "run_dir": str(tmp_path / "qs"), "workers": 1}
    report = run_quickstart(config, preset=SMOKE)
    run = tmp_path / "qs"
    # Where it logs is said once; each stage gets one header line, naming its folder.
    lines = printed.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("Logging to")] == [f"Logging to {run / 'logs'}"]
    headers = [line for line in lines if line.startswith("=== ")]
    assert headers == [f"=== [{n}/7] {name}: {what}" for n, (name, what) in enumerate(STAGES.items(), start=1)]
    assert "(diffusion/)" in headers[3]
    stages = json.loads((run / "stages.json").read_text())
    assert list(stages) == ["layout", "data", "vae", "latents", "diffusion", "samples", "evaluate", "report"]
    assert len(os.listdir(run / "data" / "train" / "user_03")) == 8
    assert len(os.listdir(run / "data" / "test" / "user_03")) == 4
    assert (run / "vae" / "config.json").exists()
    vae_metrics = json.loads((run / "vae" / "metrics.json").read_text())
    assert "rcas" in vae_metrics and "trtr" in vae_metrics
    assert (run / "latents" / "meta.json").exists() and (run / "diffusion" / "model000003.safetensors").exists()
    assert sorted(os.listdir(run / "samples" / "user_02")) == ["generated_000.png", "generated_001.png"]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["counts"] == {"real_train": 24, "real_test": 12, "generated": 6}
    for key in ("trtr", "cas", "rcas"):
        assert 0.0 <= metrics[key] <= 1.0, key
    page = open(report).read()
    # Self-contained: every picture is embedded, and the metric table is there.
    pictures = re.findall(r"<img[^>]*src=[\"']([^\"']+)", page)
    assert len(pictures) >= 4 and all(p.startswith("data:image/png;base64,") for p in pictures)
    assert "TRTR" in page and "CAS" in page and "user_03" in page

    # A rerun skips every finished stage (nothing retrains).
    mtime = (run / "diffusion" / "model000003.safetensors").stat().st_mtime
    run_quickstart(config, preset=SMOKE)
    assert (run / "diffusion" / "model000003.safetensors").stat().st_mtime == mtime
    lines = printed.readouterr().out.splitlines()
    assert sum(line.startswith("Logging to") for line in lines) == 1
    assert [line.split(":")[0] for line in lines if line.startswith("=== ")] == [
        f"=== [{n}/7] {name}" for n, name in enumerate(STAGES, start=1)]
    assert all(line.endswith("skipped") for line in lines if line.startswith("=== "))
    assert "done earlier" in (run / "logs" / "log.txt").read_text()
