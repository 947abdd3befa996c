"""The one-command quickstart: every stage, its outputs, the report, and a
rerun that skips finished stages."""

import html
import json
import os
import re
import shutil

import pytest

from guided_diffusion_vae.runtime import logger
from guided_diffusion_vae.training import checkpoint as ckpt

from guided_diffusion_vae.tools.quickstart import STAGES, quickstart_defaults, run_quickstart

SMOKE = {
    "num_users": 3, "train_per_user": 8, "test_per_user": 4, "image_size": 32,
    # identity_steps: the VAE's identity check runs, briefly (1,500 steps took 38 of the stage's 45 s).
    "vae": {"vae_size": "tiny", "lr_anneal_steps": 3, "batch_size": 4, "lr": 1e-3,
            "log_interval": 1, "save_interval": 2, "progress": False, "identity_steps": 20},
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
    # It leads with the verdict, also the last line printed; spectrogram axes in seconds and m/s (the data's metadata).
    assert page.index("<div class=\"verdict") < page.index("<nav>")
    assert lines[-1].startswith("Verdict: ") and lines[-1] in html.unescape(re.sub(r"<[^>]+>", "", page))
    assert page.count("s of walking left to right; radial velocity -1.5 to 7.5 m/s") == 3
    # Log files hold plain lines: no progress-bar redraws or cursor codes.
    logs = sorted(run.rglob("log.txt"))
    assert len(logs) >= 3
    for path in logs:
        text = path.read_text()
        assert "\x1b[" not in text and "\r" not in text, path

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


# --------------------------------------------------------------------------- #
# reruns with other settings: the stage logic, with each stage's work replaced
# by a stand-in that writes one file into the stage's folder
# --------------------------------------------------------------------------- #

import pytest  # noqa: E402

from guided_diffusion_vae.tools import quickstart
from guided_diffusion_vae.runtime.errors import UserError
from guided_diffusion_vae.runtime.files import atomic_write_bytes


@pytest.fixture
def fake_stages(monkeypatch):
    """Replace every stage's work; returns the list of stages run, in order.
    ``ran.stop["diffusion"] = True`` makes diffusion training stop early (saved)."""

    class Ran(list):
        pass

    ran = Ran()
    stop = ran.stop = {}

    def stand_in(name, folder):
        def work(run_dir, *args):
            ran.append(name)
            path = os.path.join(run_dir, folder)
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "made.txt"), "a") as f:
                f.write("made\n")
            return False if stop.get(name) else None
        return work

    for name, function in (("data", "_simulate"), ("vae", "_train_vae"), ("latents", "_encode"),
                           ("diffusion", "_train_diffusion"), ("samples", "_sample"), ("evaluate", "_evaluate")):
        monkeypatch.setattr(quickstart, function, stand_in(name, quickstart.STAGE_OUTPUTS[name][0]))

    def report(run_dir, stages):
        ran.append("report")
        atomic_write_bytes(os.path.join(run_dir, "report.html"), b"<html></html>")

    monkeypatch.setattr(quickstart, "_report", report)
    return ran


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def _other_sampling(**changes):
    return {**SMOKE, "sampling": {**SMOKE["sampling"], **changes}}


def test_a_rerun_with_other_settings_is_refused_before_any_work(tmp_path, fake_stages):
    config = {**quickstart_defaults(), "run_dir": str(tmp_path / "qs"), "workers": 1}
    run_quickstart(config, preset=SMOKE)
    assert fake_stages == list(quickstart.STAGES)

    # The same settings, and settings that do not change results, skip every stage.
    del fake_stages[:]
    run_quickstart({**config, "workers": 3}, preset=_other_sampling(batch_size=2))
    assert fake_stages == []

    # Another preset: refused at the first stage, naming the setting; nothing ran or was written.
    before = _snapshot(tmp_path / "qs")
    with pytest.raises(UserError, match=r"^stage 'data': setting 'preset' was tiny, now gpu; rerun with "
                                        r"--overwrite .* or use a new --run_dir$"):
        run_quickstart({**config, "preset": "gpu"}, preset=SMOKE)
    with pytest.raises(UserError, match=r"^stage 'samples': setting 'num_images_per_user' was 2, now 3;"):
        run_quickstart(config, preset=_other_sampling(num_images_per_user=3))
    with pytest.raises(UserError, match=r"^stage 'vae': setting 'lr' was 0.001, now 0.002;"):
        run_quickstart(config, preset={**SMOKE, "vae": {**SMOKE["vae"], "lr": 2e-3}})
    assert fake_stages == []
    assert _snapshot(tmp_path / "qs") == before


def test_overwrite_redoes_the_changed_stage_and_every_later_one(tmp_path, fake_stages):
    config = {**quickstart_defaults(), "run_dir": str(tmp_path / "qs"), "workers": 1}
    run_quickstart(config, preset=SMOKE)
    (tmp_path / "qs" / "samples" / "user_01").mkdir()  # an old sample folder must not survive
    del fake_stages[:]
    changed = _other_sampling(num_images_per_user=3)
    run_quickstart({**config, "overwrite": True}, preset=changed)
    assert fake_stages == ["samples", "evaluate", "report"]
    assert not (tmp_path / "qs" / "samples" / "user_01").exists()
    assert (tmp_path / "qs" / "data" / "made.txt").read_text().count("\n") == 1  # data were not redone
    stages = json.loads((tmp_path / "qs" / "stages.json").read_text())
    assert stages["samples"]["settings"]["num_images_per_user"] == 3
    assert "clearing" not in stages and "started" not in stages
    # The new settings are now the recorded ones: the same rerun skips, the old ones are refused.
    del fake_stages[:]
    run_quickstart(config, preset=changed)
    assert fake_stages == []
    with pytest.raises(UserError, match="was 3, now 2"):
        run_quickstart(config, preset=SMOKE)


def test_a_preset_guide_is_trained_after_the_model_and_guides_the_samples(tmp_path, printed):
    """The diffusion stage trains the guide network into diffusion/guide/ once
    the model has finished (a stop in between resumes with the guide only),
    and the samples stage guides with it."""
    preset = {**SMOKE, "guide": {"num_res_blocks": 2, "lr_anneal_steps": 2, "class_dropout_prob": 0.0},
              "sampling": {**SMOKE["sampling"], "guidance_scale": 2.0}}
    config = {**quickstart_defaults(), "run_dir": str(tmp_path / "qs"), "workers": 1, "until": "samples"}
    stopped = []
    real_training = quickstart.run_training

    def stop_the_guide(train_config, *args):
        if train_config["log_dir"].endswith("guide") and not stopped:
            stopped.append(True)
            raise KeyboardInterrupt  # as if the stage were killed while the guide trained
        return real_training(train_config, *args)

    quickstart.run_training, saved = stop_the_guide, quickstart.run_training
    try:
        with pytest.raises(KeyboardInterrupt):
            run_quickstart(config, preset=preset)
        before = _snapshot(tmp_path / "qs" / "diffusion")
        printed.readouterr()
        run_quickstart(config, preset=preset)
    finally:
        quickstart.run_training = saved
    out = printed.readouterr().out
    run = tmp_path / "qs" / "diffusion"
    # The finished model was not trained again: its files are as they were, the guide is new.
    after = _snapshot(run)
    assert "model000003.safetensors" in before
    assert {k: v for k, v in after.items() if not k.startswith("guide")} == before
    guide = ckpt.read_metadata(str(run / "guide" / "model000002.safetensors"))
    assert guide["model"]["num_res_blocks"] == 2 and guide["model"]["num_classes"] == 3  # no null class
    assert f"autoguidance from {run / 'guide'}" in out
    assert len(list((tmp_path / "qs" / "samples").rglob("generated_*.png"))) == 3 * 2


def test_a_stage_whose_results_were_deleted_is_redone_with_every_later_one(tmp_path, fake_stages, printed):
    config = {**quickstart_defaults(), "run_dir": str(tmp_path / "qs"), "workers": 1}
    run_quickstart(config, preset=SMOKE)
    shutil.rmtree(tmp_path / "qs" / "diffusion")
    del fake_stages[:]
    run_quickstart(config, preset=SMOKE)
    assert fake_stages == ["diffusion", "samples", "evaluate", "report"]
    assert "stage 'diffusion' is recorded as done but diffusion is missing" in printed.readouterr().out
    assert (tmp_path / "qs" / "samples" / "made.txt").read_text().count("\n") == 1  # old samples were removed
    del fake_stages[:]
    run_quickstart(config, preset=SMOKE)
    assert fake_stages == []


def test_an_interrupted_stage_resumes_only_with_its_own_settings(tmp_path, fake_stages):
    config = {**quickstart_defaults(), "run_dir": str(tmp_path / "qs"), "workers": 1}
    fake_stages.stop["diffusion"] = True
    assert run_quickstart(config, preset=SMOKE) is None  # stopped early, saved
    assert json.loads((tmp_path / "qs" / "stages.json").read_text())["started"]["diffusion"]["lr_anneal_steps"] == 3
    other = {**SMOKE, "diffusion": {**SMOKE["diffusion"], "lr_anneal_steps": 5}}
    with pytest.raises(UserError, match=r"^stage 'diffusion': setting 'lr_anneal_steps' was 3, now 5;"):
        run_quickstart(config, preset=other)
    fake_stages.stop.clear()
    del fake_stages[:]
    run_quickstart(config, preset=SMOKE)
    assert fake_stages == ["diffusion", "samples", "evaluate", "report"]


def test_an_overwrite_killed_while_deleting_is_finished_by_the_next_start(tmp_path, fake_stages):
    config = {**quickstart_defaults(), "run_dir": str(tmp_path / "qs"), "workers": 1}
    run_quickstart(config, preset=SMOKE)
    stages = json.loads((tmp_path / "qs" / "stages.json").read_text())
    for name in ("evaluate", "report"):
        del stages[name]
    # Written before the deletion began; "../outside" is no stage and is ignored.
    stages["clearing"] = ["evaluate", "report", "../outside"]
    (tmp_path / "qs" / "stages.json").write_text(json.dumps(stages))
    (tmp_path / "outside").mkdir()
    del fake_stages[:]
    run_quickstart(config, preset=SMOKE)
    assert fake_stages == ["evaluate", "report"]
    assert (tmp_path / "qs" / "eval" / "made.txt").read_text().count("\n") == 1  # removed, then made anew
    assert (tmp_path / "outside").is_dir()


def test_guided_sampling_without_a_null_class_is_refused_before_any_work(tmp_path, fake_stages):
    config = {**quickstart_defaults(), "run_dir": str(tmp_path / "qs"), "workers": 1}
    with pytest.raises(UserError, match=r"^preset sampling guidance_scale 1.5 needs diffusion "
                                        r"class_dropout_prob > 0 \(got 0.0\)$"):
        run_quickstart(config, preset=_other_sampling(guidance_scale=1.5, guidance_interval="20,80"))
    assert fake_stages == [] and not (tmp_path / "qs").exists()
    with pytest.raises(UserError, match=r"^preset guide: autoguidance needs sampling guidance_scale other than 1$"):
        run_quickstart(config, preset={**SMOKE, "guide": {"num_channels": 32}})
    assert fake_stages == [] and not (tmp_path / "qs").exists()
    # The shipped gpu preset guides with a guide network it trains.
    gpu = quickstart.PRESETS["gpu"]
    assert gpu["sampling"]["guidance_scale"] != 1.0 and gpu["guide"]["lr_anneal_steps"] > 0
    guided = {**SMOKE, "diffusion": {**SMOKE["diffusion"], "class_dropout_prob": 0.1},
              "sampling": {**SMOKE["sampling"], "guidance_scale": 1.5, "guidance_interval": "20,80"}}
    run_quickstart(config, preset=guided)
    assert fake_stages == list(quickstart.STAGES)
