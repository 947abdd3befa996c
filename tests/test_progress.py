"""Progress: bars on a terminal, plain lines (no carriage returns or cursor
codes) when the output goes to a file or a pipe."""

import os
import subprocess
import sys

from guided_diffusion_vae.runtime.progress import PlainProgress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SNIPPET = """
import time
from guided_diffusion_vae import progress
progress.PLAIN_INTERVAL_S = 0.05
for _ in progress.progress(range(5), desc="outer", unit="batch"):
    for _ in progress.progress(range(3), desc="inner", leave=False):
        time.sleep(0.02)
bar = progress.progress(total=4, desc="driven", unit="img")
bar.update(4)
bar.close()
"""


def test_output_to_a_pipe_gets_plain_lines_without_cursor_codes():
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", SNIPPET], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert "\r" not in text and "\x1b[" not in text
    lines = result.stdout.splitlines()
    assert lines[-2].startswith("outer: 5/5 (100%)") and "batch/s" in lines[-2] and "took" in lines[-2]
    assert lines[-1].startswith("driven: 4/4 (100%)")
    assert any(line.startswith("outer: ") and "ETA" in line for line in lines[:-2])  # periodic lines on the way
    assert not any("inner" in line for line in lines)  # inner loops stay quiet in logs


def test_plain_line_reports_rate_eta_and_postfix():
    bar = PlainProgress(total=10, desc="VAE training", unit="step", initial=2, interval_s=1e9)
    bar._start -= 4.0  # four seconds ago
    bar.update(2)
    bar.set_postfix(loss="0.1234")
    line = bar.line()
    assert line.startswith("VAE training: 4/10 (40%), 0.5 step/s, ETA 0m12s") and line.endswith("loss 0.1234")
