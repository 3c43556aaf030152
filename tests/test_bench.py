"""The benchmark runs as a user runs it (tiny scale here; the README quotes its full-size runs)."""
import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_bench_runs_every_part_and_prints_its_figures(tmp_path):
    """... and writes them into the benchmark page between its markers, as make bench does."""
    begin, end = "<!-- make bench: its latest figures, below -->\n", "<!-- make bench: end -->"
    head, rest = (REPO / "docs" / "benchmark.md").read_text().split(begin)
    tail = rest.split(end)[1]
    doc = tmp_path / "benchmark.md"
    doc.write_text(head + begin + end + tail)  # the page with nothing between its markers
    done = subprocess.run([sys.executable, "scripts/bench.py", "--scale", "0.004", "--doc", str(doc)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    page = doc.read_text()
    written = page.split(begin)[1].split(end)[0]
    assert page == head + begin + written + end + tail  # only the section between the markers
    assert "--scale 0.004" in written.splitlines()[0] and written.endswith("```\n" + out + "```\n"), written
    assert "legacy" not in out + done.stderr  # Keras's warning on saving the lab's .h5
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
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as stopped:
        bench.job_sweep(tmp_path / "nope.h5", tmp_path / "data", tmp_path / "out1", workers=1)
    message = str(stopped.value.code)
    assert message.startswith("error: the sweep failed (exit status 2): ") and "\n" not in message
    assert f"--workers 1: error: --data {tmp_path / 'data'}: not a directory" in message, message
