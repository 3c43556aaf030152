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
tasks (:class:`pruning.sweep.SweepGraph`), a few suspects at a time, so workers never wait for
one suspect's last chunks while another has work.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
from distributed import as_completed

from jobs import arguments
from jobs.campaign_file import Suspect, read_campaign
from jobs.checkpoints import CHECKPOINTS, may_hold_every_chunk
from jobs.outdir import OutputFolder
from jobs.finish import output_names
from pruning.progress import progress
from pruning.data import InputError

log = logging.getLogger("jobs.sweep")

CAMPAIGN_FILES = ("campaign.csv", "campaign.png")


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
    """Every suspect's checkpoints, as :func:`jobs.arguments.resume_note` reads one run's."""

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
        from jobs.finish import write_outputs
        from jobs.inputs import fingerprint, warn_copied_sets
        from jobs.cluster import working_client
        from pruning.defense import run_defense
        from pruning.sweep import chunk_ranges, read_back

        args, plans = self.args, self.plans
        self.out.checkpoints = AllCheckpoints(self.out.path, plans)
        with contextlib.ExitStack() as held, ThreadPoolExecutor(1) as background, \
                ThreadPoolExecutor(1) as writer, suspects_named_in_the_log():
            held.enter_context(self.out.locked())
            for plan in plans:
                held.enter_context(plan.out.locked())
            # sha256 of every input, one suspect after the other, while the cluster starts
            hashing = {plan.name: background.submit(fingerprint, plan.inputs) for plan in plans}

            def checkpoints(plan):
                if plan.out.checkpoints is None:
                    with about(plan.name):
                        plan.out.open_checkpoints(hashing[plan.name].result() | {"chunk_rows": args.chunk_rows})
                        warn_copied_sets(plan.inputs)
                return plan.out.checkpoints

            swept = {}
            for plan in plans:  # finished suspects: nothing to compute (see jobs.sweep.sweep)
                if may_hold_every_chunk(plan.out.path / CHECKPOINTS, chunk_ranges(plan.inputs.sets, args.chunk_rows)):
                    with about(plan.name):
                        found = read_back(plan.inputs, checkpoints(plan), args.chunk_rows)
                    if found is not None:
                        swept[plan.name] = found
            tuning = [plan for plan in plans if plan.args.fine_tune]
            defenses, written = {}, set()

            def defend(plan: Plan, client):
                a = plan.args
                return run_defense(plan.inputs, client, checkpoints(plan), a.thresholds, a.relative,
                                   a.fine_tune_settings if client else None, a.chunk_rows,
                                   a.prefixes_per_task, swept[plan.name])

            def write(plan: Plan) -> None:
                with about(plan.name):
                    write_outputs(plan.out.path, defenses.get(plan.name) or defend(plan, None))
                written.add(plan.name)

            writing = []

            def swept_one(plan: Plan, result) -> None:
                # its outputs at once (but for fine-tuning), in a thread of the client: the
                # loop goes on serving the workers the other suspects' tasks meanwhile
                swept[plan.name] = result
                if not plan.args.fine_tune:
                    writing.append(writer.submit(contextvars.copy_context().run, write, plan))

            if len(swept) < len(plans) or tuning:
                with working_client(args) as client:
                    if len(swept) < len(plans):
                        sweep_all(client, [plan for plan in plans if plan.name not in swept],
                                  len(plans), checkpoints, args, swept_one)
                    for plan in tuning:  # one suspect after the other, its models side by side
                        with about(plan.name):
                            defenses[plan.name] = defend(plan, client)
            for done in writing:
                done.result()  # (a failure in writing is raised here)
            for plan in plans:
                if plan.name not in written:
                    write(plan)
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


def sweep_all(client, plans: list[Plan], suspects: int, checkpoints, args, swept_one) -> None:
    """Sweep ``plans`` on one cluster, ``swept_one(plan, what run_sweep returns)`` as each is
    done; the bar counts all ``suspects`` of the campaign. One as_completed loop serves them
    all; a few suspects are in flight at a time (one more than the workers), so that a chunk's
    activations do not wait in worker memory for long, and a worker that finishes its last
    task of one suspect takes the next's."""
    from pruning.sweep import SweepGraph

    graphs = {plan.name: SweepGraph(plan.inputs, checkpoints(plan), args.chunk_rows, args.prefixes_per_task)
              for plan in plans}
    by_name = {plan.name: plan for plan in plans}
    waiting, owner, finished = list(graphs), {}, set()
    futures = as_completed()
    flight = max(2, len(client.nthreads()) + 1)
    done = suspects - len(plans) + sum(len(g.done) / len(g.ranges) for g in graphs.values())

    def finish(name: str) -> None:
        finished.add(name)
        swept_one(by_name[name], graphs[name].result())

    def start(name: str) -> None:
        with about(name):
            more = graphs[name].submit(client)
        owner.update(dict.fromkeys(more, name))
        futures.update(more)
        if graphs[name].finished():  # every chunk was checkpointed
            finish(name)

    def fill() -> None:
        while waiting and len(graphs) - len(finished) - len(waiting) < flight:
            start(waiting.pop(0))

    with progress(suspects, "campaign", "suspect", initial=done) as bar:
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
                fill()  # the next suspect's tasks first, then this one's outputs
                finish(name)


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
    from pruning.files import atomic_path, staged
    from pruning.report import write_csv

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
