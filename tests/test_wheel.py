"""A normal install works: the wheel carries the model and sample images, and the demo runs from it.

The wheel is built from this checkout and installed into a fresh virtual
environment outside the repository. That environment borrows the test
environment's dependencies (torch, timm, captum) through a path entry, so no
download is needed, but it imports captum_vit from the wheel alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    build = _run([sys.executable, "-m", "pip", "wheel", "-v", str(ROOT), "--no-deps", "--no-build-isolation",
                  "-w", str(work / "dist")], cwd=work)
    assert build.returncode == 0, build.stderr[-2000:]
    log = build.stdout + build.stderr
    for warning in ("SetuptoolsDeprecationWarning", "Package would be ignored", "SetuptoolsWarning"):
        assert warning not in log, f"setuptools warns while building the wheel: {warning}"
    wheels = list((work / "dist").glob("captum_vit-*.whl"))
    assert len(wheels) == 1
    env_dir = work / "env"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    assert made.returncode == 0, made.stderr
    python = env_dir / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    install = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    str(wheels[0])], cwd=work)
    assert install.returncode == 0, install.stderr[-2000:]
    # dependencies from the test environment, after the wheel's own site-packages
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return env_dir, work


def test_wheel_holds_the_model_and_samples_and_runs_the_demo(installed_wheel):
    env_dir, work = installed_wheel
    python = env_dir / "bin" / "python"
    env = dict(os.environ, PYTHONPATH="", MPLBACKEND="Agg")
    check = _run([str(python), "-c",
                  "import captum_vit, pathlib; from captum_vit.models import default_model, sample_images;"
                  "images, labels = sample_images(); default_model();"
                  "print(pathlib.Path(captum_vit.__file__).resolve().parent, len(images))"], cwd=work, env=env)
    assert check.returncode == 0, check.stderr[-2000:]
    package_dir, count = check.stdout.split()
    assert Path(package_dir).is_relative_to(env_dir) and int(count) >= 8, check.stdout
    demo = _run([str(env_dir / "bin" / "captum-vit"), "demo", "--out", str(work / "demo"), "--method", "reciprocam"],
                cwd=work, env=env)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert len(list((work / "demo").glob("*.png"))) >= 9
    assert (work / "demo" / "known_evidence.png").exists()  # the known-evidence model travels in the wheel
