"""pyproject.toml and environment.yml pin the same versions: one truth for pip and conda users;
and `make test` spreads the suite over its workers as tests/conftest.py says."""
import re
import shlex
import subprocess
import sys
import tomllib
from collections import defaultdict
from importlib import metadata

from conftest import REPO, scope_of


def pins(requirements) -> dict[str, str]:
    found = {}
    for line in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s;]+)\s*", line)
        if match:
            found[match.group(1).lower().replace("_", "-")] = match.group(3)
    return found


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    assert all("==" in r for r in requirements), "every dependency is pinned exactly"
    return pins(requirements)


def environment_pins() -> dict[str, str]:
    lines = [line.strip()[2:] for line in (REPO / "environment.yml").read_text().splitlines()
             if line.strip().startswith("- ") and "==" in line]
    return pins(lines)


def test_environment_yml_and_pyproject_agree():
    assert pyproject_pins() == environment_pins()
    assert {"tensorflow", "keras", "h5py", "numpy", "pandas", "dask", "dask-jobqueue", "tqdm"} <= set(pyproject_pins())


def test_the_running_environment_is_the_pinned_one():
    for package, version in pyproject_pins().items():
        assert metadata.version(package) == version, package


def test_make_tests_workers_keep_each_module_together():
    """Run with the Makefile's xdist flags: a module split over two workers would set its module
    fixtures up twice, and two SLURM tests on two workers would see each other's jobs."""
    xdist = next(line for line in (REPO / "Makefile").read_text().splitlines() if line.startswith("XDIST "))
    flags = shlex.split(xdist.split(":=", 1)[1])
    modules = ["tests/test_select.py", "tests/test_plot.py", "tests/test_slurm_config.py"]  # no TensorFlow
    run = subprocess.run([sys.executable, "-m", "pytest", *flags, "-vv", "-p", "no:cacheprovider",
                          *modules], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    workers = defaultdict(set)
    for worker, nodeid in re.findall(r"^\[(gw\d+)\].* PASSED (\S+)", run.stdout, re.M):
        workers[nodeid.split("::")[0]].add(worker)
    assert set(workers) == set(modules) and all(len(w) == 1 for w in workers.values()), workers
    assert {scope_of(f"tests/{m}::t") for m in ("test_slurm.py", "test_slurm_cluster.py",
                                                  "test_slurm_campaign.py")} == {"slurm"}
