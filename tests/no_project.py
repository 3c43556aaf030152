"""A Dask preload (``dask scheduler|worker --preload tests/no_project.py``) that makes its
process unable to import this project, as a scheduler or worker started from another
environment would be."""
import sys


class HideProject:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jobs", "pruning"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, HideProject())
for module in [m for m in sys.modules if m.split(".")[0] in ("jobs", "pruning")]:
    del sys.modules[module]
