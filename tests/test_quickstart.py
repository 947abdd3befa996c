"""The one-command quickstart: every stage, its outputs, the report, and a
rerun that skips finished stages."""

import json
import os
import re
from pathlib import Path

from guided_diffusion_vae.quickstart import quickstart_defaults, run_quickstart

SMOKE = {
    "num_users": 3, "samples_per_user": 8, "image_size": 32,
    "vae": {"vae_size": "tiny", "lr_anneal_steps": 3, "batch_size": 4, "lr": 1e-3,
            "log_interval": 1, "save_interval": 2, "progress": False},
    "diffusion": {"num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2", "attention_resolutions": "4",
                  "num_head_channels": 16, "batch_size": 4, "lr_anneal_steps": 3, "ema_rate": "0.99",
                  "log_interval": 1, "save_interval": 2, "sample_interval": 0, "compile": False,
                  "num_workers": 0, "diffusion_steps": 100},
    "sampling": {"num_images_per_user": 2, "timestep_respacing": "ddim5", "batch_size": 8},
}


def test_quickstart_runs_every_stage_and_resumes(tmp_path):
    config = {**quickstart_defaults(), "run_dir": str(tmp_path / "qs"), "workers": 1}
    report = run_quickstart(config, preset=SMOKE)
    run = tmp_path / "qs"
    stages = json.loads((run / "stages.json").read_text())
    assert list(stages) == ["data", "vae", "latents", "diffusion", "samples", "report"]
    assert (run / "data" / "user_03").is_dir() and (run / "vae" / "config.json").exists()
    assert (run / "latents" / "meta.json").exists() and (run / "diffusion" / "model000003.safetensors").exists()
    assert sorted(os.listdir(run / "samples" / "user_02")) == ["generated_000.png", "generated_001.png"]
    page = open(report).read()
    pictures = re.findall(r"<img src='([^']+)'", page)
    assert sorted(pictures) == ["report_files/loss.png", "report_files/real_vs_generated.png",
                                "samples/grid.png", "vae/reconstructions.png"]
    for picture in pictures:  # every picture resolves next to report.html
        assert (Path(report).parent / picture).is_file(), picture
    assert (run / "report_files" / "loss.png").stat().st_size > 1000

    # A rerun skips every finished stage (nothing retrains).
    mtime = (run / "diffusion" / "model000003.safetensors").stat().st_mtime
    run_quickstart(config, preset=SMOKE)
    assert (run / "diffusion" / "model000003.safetensors").stat().st_mtime == mtime
    assert "done earlier" in (run / "logs" / "log.txt").read_text()
