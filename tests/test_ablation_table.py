"""experiments/ablation_table.py: the 2 x 2 ablation's table, drops and verdict from run folders."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "ablation_table.py")


def write_run(runs, name, knn=None, linear=None, wall=None):
    folder = runs / name
    folder.mkdir()
    if knn is not None:  # an unfinished run has a folder but no scores
        (folder / "scores.json").write_text(json.dumps({"knn_top1": knn, "linear_top1": linear}))
    if wall is not None:
        (folder / "pretrain_wall_seconds.txt").write_text(str(wall))


@pytest.fixture(name="runs")
def runs_fixture(tmp_path):
    runs = tmp_path / "ablation"
    runs.mkdir()
    for name, knn, linear, wall in [
            ("nn_byol_seed0", 0.86, 0.88, 1200), ("nn_byol_seed1", 0.88, 0.88, 1260),
            ("nn_byol_seed2", 0.87, 0.88, 1320), ("nn_crops_seed0", 0.85, 0.86, 1200),
            ("nn_crops_seed1", 0.86, 0.86, 1200), ("nn_crops_seed2", None, None, None),
            ("self_byol_seed0", 0.86, 0.88, 900), ("self_byol_seed1", 0.86, 0.88, 900),
            ("self_crops_seed0", 0.80, 0.86, 960), ("self_crops_seed1", 0.82, 0.87, 960),
            ("queue1024", 0.84, 0.87, 1200), ("queue32768", None, None, None)]:
        write_run(runs, name, knn, linear, wall)
    return runs


def test_table_means_spreads_drops_and_verdicts(runs):
    done = subprocess.run([sys.executable, SCRIPT, str(runs)], capture_output=True, text=True,
                          check=True)
    lines = done.stdout.splitlines()
    # Three finished NNCLR byol seeds; the unfinished crops run of seed 2 is left out.
    assert "| NNCLR | byol | 3 | 0.8700 +- 0.0100 | 0.8800 +- 0.0000 | 21.0 min |" in lines
    assert "| NNCLR | crops | 2 | 0.8550 +- 0.0050 | 0.8600 +- 0.0000 | 20.0 min |" in lines
    assert ("| positive=self (SimCLR-style) | crops | 2 | 0.8100 +- 0.0100 | 0.8650 +- 0.0050 "
            "| 16.0 min |") in lines
    # Drops pair the runs of a seed (seed 2 has no crops run): kNN NNCLR 1 - 0.85/0.86 = 1.16 %,
    # 1 - 0.86/0.88 = 2.27 %; self 1 - 0.80/0.86 = 6.98 %, 1 - 0.82/0.86 = 4.65 %.
    assert "- kNN, NNCLR: 1.72 +- 0.55 % (seeds 0, 1: 1.16, 2.27 %)" in lines
    assert "- kNN, positive=self (SimCLR-style): 5.81 +- 1.16 % (seeds 0, 1: 6.98, 4.65 %)" in lines
    assert ("- kNN: NNCLR's drop is smaller by more than the seed spread (+4.10 points of relative "
            "drop against 1.16)") in lines
    # Linear: NNCLR 2.27 % twice; self 2.27 % and 1.14 %: NNCLR's drop is the larger one.
    assert ("- linear: NNCLR's drop is not smaller by more than the seed spread (-0.57 points of "
            "relative drop against 0.57)") in lines
    # The support-set curve adds the preset's 8,192 (nn_byol_seed0); queue32768 is unfinished.
    at = lines.index("| support set | kNN top-1 | linear top-1 |")
    assert lines[at + 2:] == ["| 1,024 | 0.8400 | 0.8700 |", "| 8,192 | 0.8600 | 0.8800 |"]
    assert (runs / "ablation.md").read_text() == done.stdout


def test_one_seed_gives_no_verdict(tmp_path):
    runs = tmp_path / "ablation"
    runs.mkdir()
    for name, knn in [("nn_byol_seed0", 0.86), ("nn_crops_seed0", 0.80),
                      ("self_byol_seed0", 0.86), ("self_crops_seed0", 0.78)]:
        write_run(runs, name, knn, 0.88, 1200)
    done = subprocess.run([sys.executable, SCRIPT, str(runs)], capture_output=True, text=True,
                          check=True)
    # 1 - 0.80/0.86 = 6.98 %, 1 - 0.78/0.86 = 9.30 %: 2.33 points, but a spread needs two seeds.
    assert ("- kNN: positive=self's drop minus NNCLR's: +2.33 points; one seed, no spread to "
            "compare with") in done.stdout.splitlines()
    assert "seed spread" not in done.stdout
