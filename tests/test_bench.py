"""The benchmark runs as a user runs it (tiny scale here; the README quotes its full-size runs)."""
import importlib.util
import logging
import re
import subprocess
import sys

import pytest

from conftest import REPO


def load_bench():
    """scripts/bench.py as a module (its ``main(argv)`` is what ``python scripts/bench.py`` runs)."""
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_bench_runs_every_part_and_prints_its_figures(tmp_path, capfd, caplog, recwarn):
    """... and writes them into the benchmark page between its markers, as make bench does.
    The script's ``main`` runs in this process (its sweeps are processes of their own, as the
    benchmark measures them): no process importing TensorFlow only to start them. What it
    prints (capfd), logs (caplog) and warns (recwarn) stands for its output."""
    begin, end = "<!-- make bench: its latest figures, below -->\n", "<!-- make bench: end -->"
    head, rest = (REPO / "docs" / "benchmark.md").read_text().split(begin)
    tail = rest.split(end)[1]
    doc = tmp_path / "benchmark.md"
    doc.write_text(head + begin + end + tail)  # the page with nothing between its markers
    bench = load_bench()
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        bench.main(["--scale", "0.004", "--doc", str(doc)])  # no SystemExit: exit status 0
    out, err = capfd.readouterr()
    said = err + caplog.text + "".join(str(warning.message) for warning in recwarn)
    page = doc.read_text()
    written = page.split(begin)[1].split(end)[0]
    assert page == head + begin + written + end + tail  # only the section between the markers
    assert "--scale 0.004" in written.splitlines()[0] and written.endswith("```\n" + out + "```\n"), written
    # Keras's warning on saving the lab's .h5 (TensorFlow's own C++ lines, which fd 2 also
    # holds in this process, may name a "legacy" pass: only Keras's sentence counts)
    assert "format is considered legacy" not in out + said
    assert re.search(r"^seeds' loop: [\d.]+ s per prefix before our core, [\d.]+ s after", out, re.M)
    assert re.search(r"^our sweep, core in one process: [\d.]+ s  \(\d+x faster\)", out, re.M)
    peaks = [float(gb) for gb in re.findall(r"peak memory ([\d.]+) GB", out)]
    assert len(peaks) == 3 and all(0.2 < gb < 8 for gb in peaks), out
    assert re.search(r"speed-up over 1 worker: [\d.]+x wall", out), out
    assert re.search(r"^4x the data, 1 worker: .*\(([\d.]+)x the 1x peak\)", out, re.M), out


def test_a_page_without_the_markers_is_refused_before_any_work(tmp_path):
    page = tmp_path / "notes.md"
    page.write_text("# notes\n")
    done = subprocess.run([sys.executable, "scripts/bench.py", "--doc", str(page)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: --doc {page} has no lines ") and page.read_text() == "# notes\n"


def test_a_failed_sweep_is_one_line_with_its_exit_status_and_error(tmp_path):
    bench = load_bench()
    with pytest.raises(SystemExit) as stopped:
        bench.job_sweep(tmp_path / "nope.h5", tmp_path / "data", tmp_path / "out1", workers=1)
    message = str(stopped.value.code)
    assert message.startswith("error: the sweep failed (exit status 2): ") and "\n" not in message
    assert f"--workers 1: error: --data {tmp_path / 'data'}: not a directory" in message, message
