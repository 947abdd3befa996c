"""Run many scripts' ``main()`` in one process, each as ``run_main`` would
from the command line, and report exit code and stderr per case.

    python run_cases.py CASES.json RESULTS.json

CASES.json: ``[{"script": path, "argv": [...]}, ...]``. One process keeps a
table of bad inputs fast: torch and diffusers are imported once.
"""

import contextlib
import io
import json
import runpy
import sys
import traceback

from guided_diffusion_vae.runtime.errors import run_main


def run_case(script, argv):
    main = runpy.run_path(script, run_name="bad_input_case")["main"]
    sys.argv = [script, *argv]
    err, out = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            run_main(main)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # what the interpreter would print for an uncaught error
            traceback.print_exc()
            code = 1
    return {"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()}


if __name__ == "__main__":
    cases_file, results_file = sys.argv[1:3]
    with open(cases_file) as f:
        cases = json.load(f)
    results = [run_case(case["script"], case["argv"]) for case in cases]
    with open(results_file, "w") as f:
        json.dump(results, f)
