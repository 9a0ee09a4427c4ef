"""Import-time promises: loading settings does not load torch."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_settings_modules_do_not_import_torch():
    # A fresh interpreter: in this one, other tests have imported torch already.
    code = "import worker.settings, training.settings, sys; assert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
