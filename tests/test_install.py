"""The package as a user installs it: ``pip install .`` (not editable) into a fresh virtualenv,
then the ``fine-pruning`` command from another folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO, assert_same_outputs
from jobs.__main__ import main


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtualenv with a copy of this checkout pip-installed into it (not editable).
    Its dependencies are this environment's, seen through a .pth line (no download, and
    seconds, not the minutes of installing TensorFlow again); this project is not among them:
    the test environment's editable install is a .pth hook that only a site folder runs."""
    root = tmp_path_factory.mktemp("install")
    source = root / "fine-pruning"  # a clean copy: the build writes into its source folder
    source.mkdir()
    for name in ("pyproject.toml", "pruning", "jobs"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (REPO / name).is_dir() else {}))
    venv = root / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                    "--quiet", "--no-deps", "--no-build-isolation", "--no-index", str(source)],
                   check=True, cwd=root)
    return venv


def test_the_installed_package_is_the_copy_not_this_checkout(installed, tmp_path):
    done = subprocess.run([installed / "bin" / "python", "-c",
                           "import jobs.settings, pruning; print(pruning.__file__); "
                           "print(jobs.settings.CONFIG_FILE, jobs.settings.CONFIG_FILE.is_file())"],
                          cwd=tmp_path, capture_output=True, text=True, check=True)
    module, config = done.stdout.splitlines()
    assert Path(module).is_relative_to(installed) and "site-packages" in module
    assert config.startswith(str(installed)) and config.endswith("jobqueue.yaml True")


@pytest.mark.slow
def test_fine_pruning_sweep_from_another_folder_gives_the_same_files(installed, demo, demo_run, tmp_path):
    """`fine-pruning sweep --single-node` as `make run` runs it, from a folder that is not
    the checkout: the same files, byte for byte; then `fine-pruning eval` on what it wrote."""
    env = {**os.environ, "FINE_PRUNING_CACHE": str(Path(demo.model).parent.parent)}
    command = installed / "bin" / "fine-pruning"
    done = subprocess.run([command, "sweep", "--single-node", "--out", "out"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_outputs(tmp_path / "out", demo_run)
    data = Path(demo.data_dir)
    done = subprocess.run([command, "eval", data / "cl/test.h5", data / "bd/bd_test.h5", "out/model_X=2.h5"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == [
        "Clean Classification accuracy", "Attack Success Rate"]


def test_the_command_names_its_commands(capsys, monkeypatch):
    import pruning.data
    monkeypatch.setattr(pruning.data, "INVOKED_AS", None)  # (set by main below; put back after)
    assert main(["--help"]) == 0
    assert "fine-pruning sweep" in capsys.readouterr().out
    assert main(["swep"]) == 2
    assert capsys.readouterr().err == ("error: no command 'swep'; give one of sweep, eval, demo "
                                       "(see fine-pruning --help)\n")
    with pytest.raises(SystemExit) as done:
        main(["demo", "--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: fine-pruning demo ")
    with pytest.raises(SystemExit) as done:
        main(["sweep", "--nope"])
    assert done.value.code == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --nope (see fine-pruning sweep --help)\n"
