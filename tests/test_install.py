"""``pip install .`` (not editable) gives a package that runs the whole
quickstart from any folder: the simulator and the configs travel inside it.
CI installs and tests exactly as the README says."""

import os
import re
import site
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _site_folders():
    """Where this interpreter finds its packages: the site-packages of the
    venv pytest may run in, then those of the interpreter it was made from."""
    folders = [*site.getsitepackages(), site.getusersitepackages()]
    return [f for f in dict.fromkeys(folders) if os.path.isdir(f)]


def _venv_seeing_this_interpreters_packages(venv):
    """A venv that sees the packages this interpreter sees (torch, diffusers,
    setuptools, wheel, ...) behind its own. ``--system-site-packages`` alone
    is not that when pytest runs in a venv: ``venv`` builds on the base
    interpreter, whose packages may lack setuptools' ``bdist_wheel``."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    # Plain lines of a .pth go after the venv's own folder on sys.path (the
    # installed project wins), and .pth files inside them are not run (an
    # editable install of the checkout stays out).
    with open(os.path.join(own, "_test_interpreter_packages.pth"), "w") as f:
        f.write("".join(folder + "\n" for folder in _site_folders()))
    return python


def test_non_editable_install_runs_the_quickstart(tmp_path):
    # Only the project itself is installed into the venv, from a copy-free build.
    python = _venv_seeing_this_interpreters_packages(tmp_path / "venv")
    build = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", ROOT], capture_output=True, text=True,
                           env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert build.returncode == 0, build.stderr[-2000:]
    script = textwrap.dedent("""
        import os, json
        import guided_diffusion_vae
        assert os.path.join("site-packages", "guided_diffusion_vae") in guided_diffusion_vae.__file__, guided_diffusion_vae.__file__
        from guided_diffusion_vae.tools.quickstart import quickstart_defaults, run_quickstart
        preset = {
            "num_users": 2, "train_per_user": 4, "test_per_user": 2, "image_size": 32,
            "vae": {"vae_size": "tiny", "lr_anneal_steps": 2, "batch_size": 2, "lr": 1e-3, "log_interval": 1,
                    "save_interval": 2, "progress": False, "identity_steps": 5},
            # The packaged YAML config, as the gpu preset names it, with a tiny network.
            "diffusion": {"config": "configs/microdoppler_small.yaml", "num_channels": 32, "channel_mult": "1,2",
                          "attention_resolutions": "4", "num_res_blocks": 1, "batch_size": 2,
                          "lr_anneal_steps": 2, "compile": False, "sample_interval": 0, "num_workers": 0,
                          "diffusion_steps": 100, "log_interval": 1, "save_interval": 2},
            "sampling": {"num_images_per_user": 1, "timestep_respacing": "ddim3", "batch_size": 4},
            "evaluate": {"classifier_steps": 5, "classifier_embed_dim": 4, "augment_k": "", "augment_generated": 1},
        }
        report = run_quickstart({**quickstart_defaults(), "run_dir": "run", "workers": 1}, preset=preset)
        assert os.path.isfile(report)
        print(json.load(open("run/stages.json"))["diffusion"]["seconds"] >= 0)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the checkout
    run = subprocess.run([python, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(env, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, (run.stdout[-1500:], run.stderr[-3000:])
    assert run.stdout.strip().endswith("True")


def test_ci_runs_the_readme_commands():
    """.ci/run runs the README's CI-machine install line and its test command, word for word."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    readme_lines = {line.strip() for block in blocks for line in block.splitlines()}
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    commands = [line for line in ci if line and not line.startswith(("#", "set ", "cd ", "export "))]
    assert commands == ['pip install -q torch==2.13.0 && pip install -q -e ".[test]"', "python -m pytest -q -rx tests"]
    assert all(command in readme_lines for command in commands)
    install = readme[readme.index("## Install"):readme.index("## Test")]
    assert "CI machine" in install and ".ci/run" in install
    # The laptop's CPU wheels and the cluster's default CUDA wheel are both there.
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme_lines
    assert "pip install torch" in readme_lines and "pip install -e ." in readme_lines
