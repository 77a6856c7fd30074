"""Execute the tutorial notebooks in place, so the committed files show their outputs.

    python tutorials/execute.py            # all three, in the current environment (about two minutes on a CPU)

``tests/test_tutorials.py`` re-executes them and fails when the committed outputs are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbclient
import nbformat

HERE = Path(__file__).resolve().parent


def main() -> None:
    for path in sorted(HERE.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(HERE)}}).execute()
        nbformat.write(notebook, path)
        print(f"executed {path.name}", file=sys.stderr)


if __name__ == "__main__":
    main()
