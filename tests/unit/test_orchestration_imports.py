"""Flows orchestrate; stages compute: importing the flows loads neither torch nor Lightning."""
from __future__ import annotations

import subprocess

from tests.conftest import PYTHON, REPO_ROOT, subprocess_env


def test_the_flows_import_no_torch():
    code = ("import sys, flows.training, flows.deploy, flows.serve, flows.promotion\n"
            "heavy = sorted(m for m in ('torch', 'lightning', 'sklearn') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    done = subprocess.run([PYTHON, "-c", code], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"the flows imported {done.stdout.strip()}"

