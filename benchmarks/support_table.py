"""Write the "Supported models" table of docs/models.md: every method on a small model of every family.

The table is measured by the test that keeps it current
(``tests/test_families.py::test_supported_models_table_is_current``, from the
literal references in ``tests/families.py``); this script runs that test with
``CAPTUM_VIT_WRITE_SUPPORT_TABLE=1``, which makes it write the table into
docs/models.md before checking it.

    python benchmarks/support_table.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/test_families.py::test_supported_models_table_is_current"

if __name__ == "__main__":
    env = dict(os.environ, CAPTUM_VIT_WRITE_SUPPORT_TABLE="1")
    raise SystemExit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST],
                                     cwd=ROOT, env=env))
