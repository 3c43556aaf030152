"""A campaign: several suspect models defended in one job, on one cluster (``--campaign FILE``).

    python -m jobs.sweep --campaign suspects.yaml --single-node --workers 4 --out results/campaign
    sbatch slurm/sweep.sh --campaign suspects.yaml --out /scratch/$USER/campaign

The file (YAML) lists the suspects, each with the flags of its own run as keys (``model``,
``weights`` + ``arch`` + ``classes``, ``rescale``, ``data`` or ``clean_valid`` ...,
``poisoned_test: {NAME: PATH}``, ``layer``, ``thresholds``, ``relative``, ``fine_tune``),
and ``defaults`` for every suspect; relative paths are the file's folder's (docs/campaign.md).
Suspect NAME runs as ``python -m jobs.sweep`` with its keys' flags, the campaign's other flags
and ``--out OUT/NAME`` would, and writes exactly that run's files there; ``OUT/campaign.csv``
and ``OUT/campaign.png`` compare the suspects. One ``as_completed`` loop serves every suspect's
tasks (:class:`jobs.sweep.SweepGraph`), a few suspects at a time, so workers never wait for
one suspect's last chunks while another has work.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import yaml
from distributed import as_completed

from jobs import arguments
from jobs.checkpoints import CHECKPOINTS, may_hold_every_chunk
from jobs.outdir import OutputFolder
from jobs.outputs import output_names
from jobs.progress import progress
from pruning.data import InputError

log = logging.getLogger("jobs.sweep")

CAMPAIGN_FILES = ("campaign.csv", "campaign.png")
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


# -- the file ----------------------------------------------------------------------------------

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


# -- the log -----------------------------------------------------------------------------------

_suspect: contextvars.ContextVar[str | None] = contextvars.ContextVar("suspect", default=None)


@contextlib.contextmanager
def about(name: str):
    """Log records made inside start with ``suspect NAME:``."""
    token = _suspect.set(name)
    try:
        yield
    finally:
        _suspect.reset(token)


@contextlib.contextmanager
def suspects_named_in_the_log():
    """While inside, records made within :func:`about` name their suspect (a record factory,
    not a handler's filter: tqdm's logging redirect swaps the handlers)."""
    factory = logging.getLogRecordFactory()

    def record(*args, **kwargs):
        made = factory(*args, **kwargs)
        name = _suspect.get()
        if name is not None and isinstance(made.msg, str):
            made.msg = f"suspect {name}: {made.msg}"
        return made

    logging.setLogRecordFactory(record)
    try:
        yield
    finally:
        logging.setLogRecordFactory(factory)


# -- the run -----------------------------------------------------------------------------------

class Plan:
    """One suspect's run: its flags parsed as its own run's, its output folder, its inputs."""

    def __init__(self, campaign: str, suspect: Suspect, argv: list[str], out: Path):
        self.name, self.line, self.campaign = suspect.name, suspect.line, campaign
        with self.blamed():
            self.args = arguments.parse_args([*suspect.flags, *argv, "--out", str(out / suspect.name)])
            self.out = OutputFolder(Path(self.args.out), output_names(self.args.thresholds, self.args.fine_tune))
            self.out.check_lock()
        self.inputs = None

    @contextlib.contextmanager
    def blamed(self):
        """Log records inside name this suspect; an input problem names it and its line."""
        with about(self.name):
            try:
                yield
            except InputError as error:
                raise InputError(f"--campaign {self.campaign}: suspect {self.name} (line "
                                 f"{self.line}): {error}") from None

    def resolve(self) -> None:
        from jobs.inputs import resolve_inputs
        with self.blamed():
            self.inputs = resolve_inputs(self.args)
            self.out.check_inputs(self.inputs.paths)


class AllCheckpoints:
    """Every suspect's checkpoints, as :func:`jobs.failures.resume_note` reads one run's."""

    def __init__(self, top: Path, plans: list[Plan]):
        self.folder, self.plans = top / "*" / CHECKPOINTS, plans

    def finished(self) -> int:
        return sum(plan.out.checkpoints.finished() for plan in self.plans if plan.out.checkpoints)


class Campaign:
    """``--campaign FILE``: read and checked as made (nothing is written); :meth:`resolve`
    checks every suspect's inputs, :meth:`run` does the work."""

    def __init__(self, args):
        self.args = args
        suspects = read_campaign(args.campaign)
        self.out = OutputFolder(Path(args.out), CAMPAIGN_FILES)
        self.out.check_lock()
        argv = without_flags(args.argv, ("--campaign", "--out"))
        self.plans = [Plan(args.campaign, suspect, argv, self.out.path) for suspect in suspects]

    def resolve(self) -> None:
        """Every suspect's inputs, checked before any work."""
        for plan in self.plans:
            plan.resolve()

    def check_line(self) -> str:
        return (f"inputs OK: campaign {self.args.campaign}, {len(self.plans)} suspects "
                f"({', '.join(plan.name for plan in self.plans)}), --out {self.out.path} writable and free")

    def run(self) -> list[str]:
        """Hold the locks of --out and of each suspect's folder, sweep every suspect on one
        cluster, write each suspect's outputs and the campaign's; return what was written."""
        from jobs import finish
        from jobs.fine_pruning import run_fine_tuning
        from jobs.inputs import warn_copied_sets
        from jobs.sweep import chunk_ranges, read_back, working_client

        args, plans = self.args, self.plans
        self.out.checkpoints = AllCheckpoints(self.out.path, plans)
        with contextlib.ExitStack() as held, ThreadPoolExecutor(1) as background, suspects_named_in_the_log():
            held.enter_context(self.out.locked())
            for plan in plans:
                held.enter_context(plan.out.locked())
            # sha256 of every input, one suspect after the other, while the cluster starts
            hashing = {plan.name: background.submit(plan.inputs.fingerprint) for plan in plans}

            def checkpoints(plan):
                if plan.out.checkpoints is None:
                    with about(plan.name):
                        plan.out.open_checkpoints(hashing[plan.name].result() | {"chunk_rows": args.chunk_rows})
                        warn_copied_sets(plan.inputs)
                return plan.out.checkpoints

            swept = {}
            for plan in plans:  # finished suspects: nothing to compute (see jobs.sweep.sweep)
                if may_hold_every_chunk(plan.out.path / CHECKPOINTS, chunk_ranges(plan.inputs, args.chunk_rows)):
                    with about(plan.name):
                        found = read_back(plan.inputs, checkpoints(plan), args.chunk_rows)
                    if found is not None:
                        swept[plan.name] = found
            tuning = [plan for plan in plans if plan.args.fine_tune]
            tuned = {}
            if len(swept) < len(plans) or tuning:
                with working_client(args) as client:
                    if len(swept) < len(plans):
                        swept |= sweep_all(client, plans, swept, checkpoints, args)
                    for plan in tuning:  # one suspect after the other, its models side by side
                        with about(plan.name):
                            started = time.perf_counter()
                            tuned[plan.name] = run_fine_tuning(plan.inputs, plan.args, client, checkpoints(plan),
                                                               *swept[plan.name][:2])
                            swept[plan.name][2]["fine_tune_s"] = time.perf_counter() - started
            for plan in plans:
                with about(plan.name):
                    finish.write_outputs(plan.inputs, plan.args, plan.out.path, *swept[plan.name],
                                         tuned=tuned.get(plan.name))
            write_campaign_files(self.out.path, plans)
        return [*CAMPAIGN_FILES, *(plan.name + "/" for plan in plans)]


def without_flags(argv: list[str], flags) -> list[str]:
    """``argv`` without the given flags and their values (``--flag V`` or ``--flag=V``)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in flags:
            skip = True
        elif not token.startswith(tuple(f"{flag}=" for flag in flags)):
            kept.append(token)
    return kept


def sweep_all(client, plans: list[Plan], swept: dict, checkpoints, args) -> dict:
    """Sweep every suspect not in ``swept`` on one cluster; return ``name -> what
    run_sweep returns``. One as_completed loop serves them all; a few suspects are in flight at
    a time (one more than the workers), so that a chunk's activations do not wait in worker
    memory for long, and a worker that finishes its last task of one suspect takes the next's."""
    from jobs.sweep import SweepGraph

    graphs = {plan.name: SweepGraph(plan.inputs, checkpoints(plan), args.chunk_rows, args.prefixes_per_task)
              for plan in plans if plan.name not in swept}
    waiting, owner, results = list(graphs), {}, {}
    futures = as_completed()
    flight = max(2, len(client.nthreads()) + 1)
    started = len(swept) + sum(len(g.done) / len(g.ranges) for g in graphs.values())

    def start(name: str) -> None:
        with about(name):
            more = graphs[name].submit(client)
        owner.update(dict.fromkeys(more, name))
        futures.update(more)
        if graphs[name].finished():
            results[name] = graphs[name].result()

    def fill() -> None:  # (a suspect whose chunks were all checkpointed finishes as it starts)
        while waiting and len(graphs) - len(results) - len(waiting) < flight:
            start(waiting.pop(0))

    with progress(len(plans), "campaign", "suspect", initial=started) as bar:
        fill()
        for future in futures:
            name = owner.pop(future)
            graph = graphs[name]
            with about(name):
                more, evaluated = graph.collect(client, future)
            owner.update(dict.fromkeys(more, name))
            futures.update(more)
            bar.update(evaluated / (graph.prefixes * len(graph.ranges)))
            if graph.finished():
                results[name] = graph.result()
                fill()
    return results


# -- the campaign's own files ------------------------------------------------------------------

def campaign_frame(plans: list[Plan]) -> pd.DataFrame:
    """campaign.csv: per suspect and threshold, B's scores (k = 0), the k selected, G's scores
    and, with fine-tuning, the fine-tuned model's; read from the files each suspect's run wrote."""
    rows = []
    for plan in plans:
        def read(name):
            return pd.read_csv(plan.out.path / name, float_precision="round_trip")

        b = read("results.csv").iloc[0]
        b_scores = {f"B_{column}": b[column] for column in b.index if column.startswith(("valid_", "test_"))}
        tuned = read("finepruning.csv") if plan.args.fine_tune else None
        goodnet = read("goodnet.csv")
        for _, g in goodnet.iterrows():
            row = {"suspect": plan.name, "threshold": g["threshold"], "channels_pruned": g["channels_pruned"],
                   **b_scores, **{f"G_{column}": g[column] for column in goodnet.columns[2:]}}
            if tuned is not None:
                same = tuned[tuned["threshold"] == g["threshold"]]
                row |= {f"finetuned_{column}": same.iloc[0][column] for column in tuned.columns
                        if column not in ("run", "threshold", "channels_pruned")} if len(same) else {}
            rows.append(row)
    frame = pd.DataFrame(rows)
    groups = ("suspect", "threshold", "channels_pruned", "B_valid", "B_test", "G_", "finetuned_")
    frame = frame[sorted(frame.columns, key=lambda c: next(i for i, g in enumerate(groups) if c.startswith(g)))]
    frame["channels_pruned"] = frame["channels_pruned"].astype("Int64")
    return frame


def write_campaign_files(out: Path, plans: list[Plan]) -> None:
    from pruning.report import atomic_path, staged, write_csv

    frame = campaign_frame(plans)
    with staged() as replace_all:
        write_csv(out / "campaign.csv", frame)
        with atomic_path(out / "campaign.png") as temporary:
            campaign_figure(frame).savefig(temporary, format="png")
        replace_all()
    log.info("campaign: %d suspects compared in %s", len(plans), out / "campaign.csv")


def campaign_figure(frame: pd.DataFrame):
    """campaign.png: per suspect, clean test accuracy (left) and the highest attack success rate
    over its poisoned test sets (right), of B and of G at each threshold."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(7, 1.6 * frame["suspect"].nunique() + 3), 4.2), layout="constrained")
    suspects = list(dict.fromkeys(frame["suspect"]))
    thresholds = list(dict.fromkeys(frame["threshold"]))
    width = 0.8 / (len(thresholds) + 1)
    for axes, (title, clean) in zip(figure.subplots(1, 2), (("clean test accuracy (%)", True),
                                                            ("highest test ASR (%)", False))):
        def score(row, who):
            if clean:
                return row.get(f"{who}_test_accuracy", float("nan"))
            values = [row[c] for c in row.index if c.startswith(f"{who}_test_asr") and pd.notna(row[c])]
            return max(values) if values else float("nan")

        for i, who in enumerate(["B", *thresholds]):
            heights = []
            for suspect in suspects:
                rows = frame[frame["suspect"] == suspect]
                rows = rows if who == "B" else rows[rows["threshold"] == who]  # (none: not its threshold)
                heights.append(score(rows.iloc[0], "B" if who == "B" else "G") if len(rows) else float("nan"))
            positions = [s + (i - len(thresholds) / 2) * width for s in range(len(suspects))]
            axes.bar(positions, heights, width, label="B" if who == "B" else f"G, X={who:g}")
        axes.set_xticks(range(len(suspects)), suspects, rotation=20, ha="right")
        axes.set_ylim(0, 100)
        axes.set_title(title)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return figure
