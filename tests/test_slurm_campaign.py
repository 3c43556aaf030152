"""`sbatch slurm/sweep.sh --campaign FILE` on a real one-node SLURM (scripts/slurm_local.sh)."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from conftest import REPO, assert_same_outputs
from slurm_fixtures import slurm_cluster, submit_and_wait  # noqa: F401 (fixture)
from test_slurm import SMALL


def test_a_campaign_as_one_batch_job(slurm_cluster, demo, demo_run, tmp_path):
    from tiny import tiny_deepid, write_sets

    model = tiny_deepid(seed=7)
    model.save(tmp_path / "tiny.keras")
    write_sets(model, tmp_path / "data")
    # the embedded demo (a suspect with no model and no data) and a tiny net of one's own
    (tmp_path / "campaign.yaml").write_text(
        "suspects:\n  - name: demo\n  - {name: tiny, model: tiny.keras, data: data, thresholds: 4}\n")
    cache = Path(demo.model).parent.parent
    # three tasks: scheduler, client and one worker rank (test_slurm.py runs sweep.sh's default four)
    job_id, log = submit_and_wait(["--ntasks=3", *SMALL, f"--export=ALL,FINE_PRUNING_CACHE={cache}",
                                   f"--output={tmp_path}/%x-%j.out", str(REPO / "slurm" / "sweep.sh"),
                                   "--campaign", "campaign.yaml", "--out", "out"], timeout=480, cwd=tmp_path)
    out = tmp_path / "out"
    assert "outputs in" in log, log[-3000:]
    assert_same_outputs(out / "demo", demo_run)  # what the demo's own run writes
    assert re.search(r"INFO [\w.]+: suspect tiny: reused from checkpoints: 0 of 4 chunks", log), log[-3000:]
    table = pd.read_csv(out / "campaign.csv")
    assert list(table["suspect"]) == ["demo"] * 3 + ["tiny"]
    assert list(table["threshold"]) == [2.0, 4.0, 10.0, 4.0]
    assert (out / "tiny" / "model_X=4.h5").is_file() and (out / "campaign.png").is_file()
