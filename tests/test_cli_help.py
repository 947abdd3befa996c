"""``--help`` of every script: each flag says what it does and its default,
a flag with a few possible values lists them (checked against the tables
the code validates with), and the usage examples read as written."""

import argparse
import contextlib
import glob
import io
import os
import re
import runpy
import sys

import pytest

from guided_diffusion_vae.core import gaussian_diffusion, resample, sample_loop, samplers, script_util, unet
from guided_diffusion_vae.data import labels
from guided_diffusion_vae.latent import latent_datasets, vae_wrapper
from guided_diffusion_vae.tools import quickstart
from guided_diffusion_vae.sampling import sample_from_checkpoint
from guided_diffusion_vae.training import train_util, vae_training
from guided_diffusion_vae.training.diffusion_training import pixel_train_defaults
from guided_diffusion_vae.runtime.flag_help import describe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py")))
SAMPLING_SCRIPTS = ("image_sample.py", "image_sample_vae.py", "interpolate.py")

# Flags whose values come from a table: every value must be in the flag's help.
ENUMERATED = {
    "sampler": samplers.SAMPLER_NAMES,
    "clip_denoised": ("auto", *sample_loop.CLIP_MODES),
    "preset": tuple(quickstart.PRESETS),
    "until": tuple(quickstart.STAGES),
    "label_source": labels.LABEL_SOURCES,
    "vae_size": tuple(vae_training.PRESETS),
    "noise_schedule": tuple(gaussian_diffusion.BETA_SCHEDULES),
    "schedule_sampler": tuple(resample.SCHEDULE_SAMPLERS),
    "classifier_pool": unet.POOLS,
    "cache_dtype": latent_datasets.CACHE_DTYPES,
    "vae_dtype": tuple(vae_wrapper.DTYPES),
    "input_range": vae_wrapper.INPUT_RANGES,
    "latent_scale": vae_wrapper.LATENT_SCALE_WORDS,
    "device": ("auto", "cpu", "cuda"),
    "timestep_spacing": ("auto", *samplers.TIMESTEP_SPACINGS),
}


def precisions(script):
    return sample_loop.SAMPLING_PRECISIONS if os.path.basename(script) in SAMPLING_SCRIPTS else train_util.PRECISIONS


def help_output(script):
    """What ``python SCRIPT --help`` prints, run in this process."""
    environ, argv = dict(os.environ), sys.argv
    out = io.StringIO()
    try:
        os.environ["COLUMNS"] = "100"
        main = runpy.run_path(script, run_name="help_case")["main"]
        sys.argv = [script, "--help"]
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            main()
    finally:
        os.environ.clear()
        os.environ.update(environ)
        sys.argv = argv
    assert exit_.value.code == 0, script
    return out.getvalue()


def flag_texts(output):
    """``{flag: its help text on one line}`` from argparse's options section."""
    texts, flag = {}, None
    for line in output.split("\noptions:\n", 1)[1].splitlines():
        start = re.match(r"^  (-[^ ]*(?: [^ ]+)*)(?:\s{2,}(.*))?$", line)
        if start:
            flag = re.findall(r"--(\w+)", start.group(1))[-1]
            texts[flag] = start.group(2) or ""
        elif flag and line.startswith("   "):
            texts[flag] = (texts[flag] + " " + line.strip()).strip()
    return texts


def mentions(text, value):
    return re.search(rf"(?<![\w-]){re.escape(value)}(?![\w])", text) is not None


@pytest.fixture(scope="module")
def outputs():
    return {os.path.basename(script): help_output(script) for script in SCRIPTS}


def test_every_script_describes_every_flag_with_its_default(outputs):
    assert {"image_train.py", "image_sample.py", "classifier_train.py", "benchmark.py"} <= set(outputs)
    undescribed, no_default = [], []
    for name, output in outputs.items():
        for flag, text in flag_texts(output).items():
            description = re.sub(r"\((choices: .*; )?default: .*\)$", "", text).strip()
            if not description:
                undescribed.append(f"{name} --{flag}")
            if flag not in ("help", "config", "debug") and not re.search(r"default: \S", text):
                no_default.append(f"{name} --{flag}")
    assert undescribed == [] and no_default == []


def test_enumerated_flags_list_their_values(outputs):
    missing, checked = [], 0
    for name, output in outputs.items():
        for flag, text in flag_texts(output).items():
            values = precisions(name) if flag == "precision" else ENUMERATED.get(flag, ())
            checked += bool(values)
            missing += [f"{name} --{flag}: {value}" for value in values if not mentions(text, value)]
    assert missing == [] and checked > 40


def test_quickstart_help_lists_its_presets_and_stages(outputs):
    texts = flag_texts(outputs["quickstart.py"])
    for name, preset in quickstart.PRESETS.items():
        assert name in texts["preset"] and preset["about"] in texts["preset"]
    listed = re.search(r"choices: ([^;]*);", texts["until"]).group(1).split(" | ")
    assert listed == list(quickstart.STAGES) == ["data", "vae", "latents", "diffusion", "samples", "evaluate",
                                                 "report"]


def test_usage_examples_keep_their_lines(outputs):
    """A docstring line ending in a backslash must reach --help as written
    (in a plain string a single backslash would join it to the next line)."""
    for script in SCRIPTS:
        source = open(script).read()
        docstring = source.split('"""')[1].replace("\\\\", "\\")
        printed = [line.rstrip() for line in outputs[os.path.basename(script)].splitlines()]
        assert [line for line in docstring.splitlines() if line.rstrip() not in printed] == [], script


def test_one_name_is_described_by_the_program_it_belongs_to():
    """batch_size and precision mean different things to training and sampling."""
    train_text, train_choices = describe(pixel_train_defaults())
    sample_text, sample_choices = describe(sample_from_checkpoint.sample_defaults())
    assert train_text["batch_size"] == train_util.FLAG_HELP["batch_size"]
    assert sample_text["batch_size"] == sample_from_checkpoint.FLAG_HELP["batch_size"]
    assert train_choices["precision"] == train_util.PRECISIONS
    assert sample_choices["precision"] == sample_loop.SAMPLING_PRECISIONS
    # The model flags keep script_util's words, extended where sampling reads them otherwise.
    assert train_text["num_channels"] == script_util.FLAG_HELP["num_channels"]
    assert sample_text["num_channels"].startswith(script_util.FLAG_HELP["num_channels"] + " (")


def test_original_argparser_helper_describes_its_flags(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    parser = argparse.ArgumentParser()
    script_util.add_dict_to_argparser(parser, script_util.model_and_diffusion_defaults())
    texts = flag_texts(parser.format_help())
    assert set(texts) == {"help", *script_util.model_and_diffusion_defaults()}
    assert texts["noise_schedule"].startswith(script_util.FLAG_HELP["noise_schedule"])
    assert "choices: linear | cosine; default: 'linear'" in texts["noise_schedule"]
