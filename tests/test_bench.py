"""The benchmark runs as a user runs it (tiny scale here; the README quotes its full-size runs)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_runs_every_part_and_prints_its_figures():
    done = subprocess.run([sys.executable, "scripts/bench.py", "--scale", "0.004"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "WARNING" not in done.stdout + done.stderr
    assert re.search(r"^seeds' loop: [\d.]+ s per prefix before our core, [\d.]+ s after", out, re.M)
    assert re.search(r"^our sweep, core in one process: [\d.]+ s  \(\d+x faster\)", out, re.M)
    peaks = [float(gb) for gb in re.findall(r"peak memory ([\d.]+) GB", out)]
    assert len(peaks) == 3 and all(0.2 < gb < 8 for gb in peaks), out
    assert re.search(r"speed-up over 1 worker: [\d.]+x wall", out), out
    assert re.search(r"^4x the data, 1 worker: .*\(([\d.]+)x the 1x peak\)", out, re.M), out
