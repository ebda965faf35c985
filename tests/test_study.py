"""The batch-size study driver: every config parses, --quick produces every output."""

import csv
import glob
import math
import os
import sys

import pytest

pytest.importorskip("lightning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))
import batch_size_study as study  # noqa: E402

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "study_*.yaml")))
OUTPUTS = ["runs.csv", "summary.md", "val_vs_batch.png", "learning_curves.png", "curves.json"]


@pytest.mark.parametrize("config", CONFIGS, ids=[os.path.basename(c)[:-5] for c in CONFIGS])
def test_every_study_config_parses(config):
    args = study.parser().parse_args(["--config", config])
    assert args.task in study.TASKS and args.lr_rule in study.LR_RULES
    assert (args.path is None) != (args.hub is None)
    assert args.out.startswith("results/batch_size_study/")
    with open(config) as f:
        assert f.readline().startswith(
            f"# python recipes/batch_size_study.py --config configs/{os.path.basename(config)}"
        )


def test_learning_rate_rule():
    args = study.parser().parse_args(["--base_lr", "0.004", "--base_batch", "16"])
    assert study.learning_rate(args, 16) == pytest.approx(0.004)
    assert study.learning_rate(args, 4) == pytest.approx(0.002)  # sqrt(1/4)
    args.lr_rule = "linear"
    assert study.learning_rate(args, 4) == pytest.approx(0.001)


def _check_outputs(out, rows, norms):
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    with open(out / "runs.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 3 * len(norms) * 2  # batch sizes 1, 2, 8 x norms x 2 seeds
    for row in table:
        if row["norm"] == "batch" and row["batch_size"] == "1":
            assert row["status"].startswith("n/a")  # reported, not a crash
            continue
        assert row["status"] == "ok" and math.isfinite(float(row["val_error"]))
        assert int(row["steps"]) * int(row["batch_size"]) == 64  # equal samples at every size
        assert (row["train_eval_gap"] != "") == (row["norm"] == "batch")
    summary = (out / "summary.md").read_text()
    assert "| batch | n/a |" in summary and "gap" in summary


def test_quick_check_does_not_write_over_the_shipped_results():
    config = os.path.join(ROOT, "configs", "study_char_lm_shakespeare.yaml")
    full = study.parser().parse_args(["--config", config])
    quick = study.parser().parse_args(["--config", config, "--quick", "true"])
    assert study.output_dir(full) == study.Path("results/batch_size_study/char_lm_shakespeare")
    assert study.output_dir(quick) == study.Path("runs/batch_size_study/char_lm_shakespeare")
    elsewhere = study.parser().parse_args(["--config", config, "--quick", "true", "--out", "x/y"])
    assert study.output_dir(elsewhere) == study.Path("x/y")


@pytest.mark.slow
def test_quick_char_lm_writes_every_output(tmp_path):
    rows = study.main(["--quick", "true", "--out", str(tmp_path)])  # Python's docs: offline
    _check_outputs(tmp_path, rows, ["none", "batch", "layer", "group"])
    (tmp_path / "val_vs_batch.png").unlink()
    again = study.main(["--quick", "true", "--out", str(tmp_path), "--replot", "true"])
    assert (tmp_path / "val_vs_batch.png").stat().st_size > 0
    assert [(r["norm"], r["batch_size"], r.get("val_error")) for r in again] == [
        (r["norm"], r["batch_size"], r.get("val_error")) for r in rows
    ]


@pytest.mark.slow
def test_quick_classification_writes_every_output(tmp_path):
    tsv = tmp_path / "reviews.tsv"
    lines = [
        f"{i % 2}\t{'a fine good film' if i % 2 else 'a dull bad film'} {i}" for i in range(300)
    ]
    tsv.write_text("label\ttext\n" + "\n".join(lines) + "\n")
    out = tmp_path / "out"
    rows = study.main(
        ["--quick", "true", "--task", "classify", "--path", str(tsv), "--out", str(out)]
    )
    _check_outputs(out, rows, ["none", "batch", "layer", "group"])
