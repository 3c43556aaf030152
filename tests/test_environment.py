"""pyproject.toml and environment.yml pin the same versions: one truth for pip and conda users."""
import re
import tomllib
from importlib import metadata

from conftest import REPO


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
