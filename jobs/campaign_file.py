"""A campaign file (``--campaign FILE``, :mod:`jobs.campaign`): its suspects, read and checked.

Each suspect is a mapping of the flags of its own run (``model``, ``data``, ``rescale``, ...:
:data:`SUSPECT_KEYS`), with ``defaults`` for every suspect. A malformed file is one
:class:`InputError` line naming the key and its line; relative paths are the file's folder's.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from jobs import arguments
from jobs.checkpoints import CHECKPOINTS
from pruning.data import InputError

# key -> what its value must be; each is the flag --KEY (with - for _) of a single run
SUSPECT_KEYS = {
    "name": "text", "model": "path", "weights": "path", "arch": "text", "classes": "whole number",
    "demo": "text", "data": "path", "clean_valid": "path", "clean_test": "path",
    "poisoned_valid": "sets", "poisoned_test": "sets", "rescale": "rescale", "layer": "text",
    "thresholds": "thresholds", "relative": "true or false", "fine_tune": "fine-tuning",
}
FINE_TUNE_KINDS = {name: "whole number" if kind is int else "number"
                   for name, (kind, _, _) in arguments.FINE_TUNE_FLAGS.items()}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # a folder in OUT


class Suspect:
    """One suspect of the file: its name, the line it starts on, its settings (defaults
    included) as ``key -> value``, and its run's flags (paths made the file's folder's)."""

    def __init__(self, name: str, line: int, settings: dict, folder: Path):
        self.name, self.line, self.settings = name, line, settings
        self.flags = suspect_flags(settings, folder)


def read_campaign(path: str) -> list[Suspect]:
    """The suspects of a campaign file, checked: a malformed file raises one InputError line
    naming the key and its line."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"--campaign {path} cannot be read ({getattr(error, 'strerror', None) or error}); "
                         "give the campaign's YAML file") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise bad(path, mark.line + 1 if mark else 1,
                  f"not valid YAML ({getattr(error, 'problem', None) or error})") from None

    def value(node):
        return loader.construct_object(node, deep=True)

    try:
        if not isinstance(root, yaml.MappingNode):
            raise bad(path, root.start_mark.line + 1 if root else 1,
                      "the file must be a mapping with 'suspects:' (a list) and optionally 'defaults:'")
        top = mapping(path, root, "the file", {"defaults", "suspects"})
        defaults = settings(path, top["defaults"][1], "defaults", value) if "defaults" in top else {}
        if "name" in defaults:
            raise bad(path, defaults["name"][0], "'name' belongs to each suspect, not to defaults")
        if "suspects" not in top:
            raise bad(path, root.start_mark.line + 1, "no 'suspects:' list")
        items = top["suspects"][1]
        if not isinstance(items, yaml.SequenceNode) or not items.value:
            raise bad(path, items.start_mark.line + 1, "'suspects' must be a list of suspects, "
                                                       "each a mapping with a name")
        suspects, lines = [], {}
        for number, item in enumerate(items.value, start=1):
            own = settings(path, item, f"suspect {number}", value)
            line = item.start_mark.line + 1
            if "name" not in own:
                raise bad(path, line, f"suspect {number} has no 'name'")
            name_line, name = own["name"]
            if not NAME.fullmatch(name) or name == CHECKPOINTS:
                raise bad(path, name_line, f"suspect name {name!r} is its folder in --out: use letters, "
                                           "digits, '_', '.' and '-' (not first), and not 'checkpoints'")
            if name in lines:
                raise bad(path, name_line, f"suspect name {name!r} is given twice (also line {lines[name]})")
            lines[name] = name_line
            merged = {key: given for key, (_, given) in (defaults | own).items() if key != "name"}
            suspects.append(Suspect(name, line, merged, Path(path).resolve().parent))
        return suspects
    finally:
        loader.dispose()


def bad(path: str, line: int, problem: str) -> InputError:
    return InputError(f"--campaign {path} line {line}: {problem}")


def mapping(path: str, node, where: str, keys) -> dict[str, tuple[int, object]]:
    """``key -> (line, value node)`` of a mapping node; unknown and repeated keys refused."""
    if not isinstance(node, yaml.MappingNode):
        raise bad(path, node.start_mark.line + 1, f"{where} must be a mapping (KEY: VALUE lines)")
    found = {}
    for key_node, value_node in node.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode) or key not in keys:
            raise bad(path, line, f"unknown key {key!r} in {where}; known keys: {', '.join(sorted(keys))}")
        if key in found:
            raise bad(path, line, f"key {key!r} is given twice in {where} (also line {found[key][0]})")
        found[key] = (line, value_node)
    return found


def settings(path: str, node, where: str, value) -> dict[str, tuple[int, object]]:
    """``key -> (line, value)`` of a suspect (or the defaults), each value of its key's kind."""
    found = {}
    for key, (line, value_node) in mapping(path, node, where, SUSPECT_KEYS).items():
        given = value(value_node)
        problem = kind_problem(SUSPECT_KEYS[key], given)
        if problem is None and key == "fine_tune" and isinstance(given, dict):
            for name, setting in given.items():
                if name not in FINE_TUNE_KINDS:
                    raise bad(path, line, f"unknown key {name!r} in {where}'s fine_tune; known keys: "
                                          f"{', '.join(FINE_TUNE_KINDS)}")
                problem = kind_problem(FINE_TUNE_KINDS[name], setting)
                if problem:
                    key = f"fine_tune.{name}"
                    break
        if problem:
            raise bad(path, line, f"{where}'s {key} must be {problem}, got {given!r}")
        found[key] = (line, given)
    return found


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def kind_problem(kind: str, value) -> str | None:
    """What ``value`` should have been, or None if it is of ``kind``."""
    ok = {"text": isinstance(value, str) and value != "",
          "path": isinstance(value, str) and value != "",
          "whole number": isinstance(value, int) and not isinstance(value, bool),
          "number": _number(value),
          "true or false": isinstance(value, bool),
          "rescale": _number(value) or isinstance(value, str),
          "thresholds": _number(value) or isinstance(value, list) and bool(value) and all(map(_number, value)),
          "sets": isinstance(value, str) and value != "" or isinstance(value, dict) and bool(value) and all(
              isinstance(k, str) and isinstance(v, str) and v for k, v in value.items()),
          "fine-tuning": isinstance(value, (bool, dict))}[kind]
    return None if ok else WANTED.get(kind, kind if kind == "true or false" else f"a {kind}")


WANTED = {"path": "a path", "text": "text", "rescale": "a number or fraction such as 1/255",
          "thresholds": "a number or a list of numbers, e.g. [2, 4, 10]",
          "sets": "a path, or a mapping NAME: PATH",
          "fine-tuning": "true, false or a mapping of its settings (epochs: 5, ...)"}


def suspect_flags(given: dict, folder: Path) -> list[str]:
    """A suspect's settings as the flags of its own run."""
    def place(path: str) -> str:
        return str(folder / os.path.expanduser(path))  # an absolute path stays as it is

    flags = []
    for key, value in given.items():
        flag = "--" + key.replace("_", "-")
        if SUSPECT_KEYS[key] == "path":
            flags += [flag, place(value)]
        elif key in ("poisoned_valid", "poisoned_test"):
            sets = {"": value} if isinstance(value, str) else value
            flags += [part for name, path in sets.items()
                      for part in (flag, f"{name}={place(path)}" if name else place(path))]
        elif key == "thresholds":
            flags += [flag, *map(str, value if isinstance(value, list) else [value])]
        elif key in ("relative", "fine_tune"):
            flags += [flag] if value else []
            if isinstance(value, dict):
                flags += [part for name, setting in value.items() for part in (f"--fine-tune-{name}", str(setting))]
        else:
            flags += [flag, str(value)]
    return flags
