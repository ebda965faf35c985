"""The batch-size study: its configs, the grid's choices, resuming, the report and --quick."""

import csv
import glob
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("lightning")

import torch

from seqnorm.lightning import report
from seqnorm.lightning.callbacks import BatchStatistics, TrainingCurve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))
import batch_size_study as study  # noqa: E402

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "study_*.yaml")))
OUTPUTS = ["study.json", "runs.csv", "summary.md", "error_vs_batch.png", "learning_curves.png"]


def first_line_command(config):
    with open(config) as f:
        return f.readline().removeprefix("# ").split()


@pytest.mark.parametrize("config", CONFIGS, ids=[os.path.basename(c)[:-5] for c in CONFIGS])
def test_every_study_config_starts_with_its_command_and_resolves(config, capsys):
    command = first_line_command(config)
    assert command[:3] == ["python", "recipes/batch_size_study.py", command[2]]
    assert command[2] in study.RECIPES and command[3:] == [
        "--config",
        f"configs/{os.path.basename(config)}",
    ]
    with pytest.raises(SystemExit) as exit_:
        study.main([command[2], "--config", config, "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "sweep:" in printed and "model:" in printed and "trainer:" in printed
    cli = study.RECIPES[command[2]](args=["--config", config], run=False)
    sweep = study.Sweep(**cli.config.sweep.as_dict())
    study.check_sweep(sweep)
    assert sweep.out.startswith("results/batch_size_study/")
    assert len(sweep.lr_multipliers) >= 3 and min(sweep.lr_multipliers) < 1 < max(
        sweep.lr_multipliers
    )


def test_the_recipe_is_named_first():
    with pytest.raises(SystemExit, match=r"Expected the recipe .*got '--config'"):
        study.main(["--config", CONFIGS[0]])


def test_learning_rate_rule():
    sweep = study.Sweep(base_batch=16)
    assert study.learning_rate(0.004, sweep, 16) == pytest.approx(0.004)
    assert study.learning_rate(0.004, sweep, 4) == pytest.approx(0.002)  # sqrt(1/4)
    assert study.learning_rate(0.004, sweep, 4, 2.0) == pytest.approx(0.004)
    sweep.lr_rule = "linear"
    assert study.learning_rate(0.004, sweep, 4) == pytest.approx(0.001)
    sweep.lr_rule = "constant"
    assert study.learning_rate(0.004, sweep, 4) == pytest.approx(0.004)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"norms": ["layer", "instance"]}, "sweep.norms"),
        ({"lr_rule": "cubic"}, "sweep.lr_rule"),
        ({"tune_seed": 7}, "sweep.tune_seed.*one of the seeds"),
        ({"lr_multipliers": [1.0, 0.0]}, "sweep.lr_multipliers"),
        ({"samples": 8}, "sweep.samples.*64"),
        ({"batch_sizes": []}, "sweep.batch_sizes"),
    ],
)
def test_a_grid_that_cannot_run_is_refused_first(change, match):
    with pytest.raises(ValueError, match=match):
        study.check_sweep(study.Sweep(**change))


def _tuning(errors, status="ok"):
    return [
        {"status": status, "val_error": e, "settings": {"lr_multiplier": m}}
        for m, e in errors.items()
    ]


def test_the_choice_is_the_lowest_finite_tuning_error():
    assert report.choose(_tuning({0.5: 3.1, 1.0: 2.9, 2.0: 3.0})) == 1.0
    assert report.choose(_tuning({0.5: 3.1, 1.0: math.nan, 2.0: 3.0})) == 2.0
    assert report.choose(_tuning({0.5: math.nan, 1.0: math.inf})) is None
    assert report.choose(_tuning({0.5: 0.0}, status="n/a: no batch statistics")) is None


def test_tables_without_batch_norm_have_no_gap_section():
    sweep = {
        "norms": ["none", "layer"],
        "batch_sizes": [1],
        "seeds": [0, 1],
        "lr_multipliers": [0.5, 1.0],
        "tune_seed": 0,
    }
    study = {"sweep": sweep, "metric": "bits per character"}
    results = [
        {
            "status": "ok",
            "val_error": 3.0 - m + seed,
            "test_error": 2.5 + seed,
            "train_seconds": 1.0,
            "settings": {"norm": n, "batch_size": 1, "lr_multiplier": m, "seed": seed, "lr": m},
        }
        for n in sweep["norms"]
        for m in sweep["lr_multipliers"]
        for seed in (0, 1)
    ]
    text = report.tables(study, report.summarize(study, results))
    assert "gap" not in text and "\n\n\n" not in text
    assert "| none | 3.000 ± 0.707 |" in text and "| layer | 1.00e+00 (x1, edge) |" in text


def test_training_curve_averages_over_samples():
    class Logger:
        def __init__(self):
            self.logged = []

        def log_metrics(self, metrics, step):
            self.logged.append((step, metrics))

    class Trainer:
        def __init__(self):
            self.loggers, self.global_step = [Logger()], 0

    trainer, curve = Trainer(), TrainingCurve(every=4)
    for step, loss in enumerate([1.0, 3.0, 5.0, 7.0], start=1):
        trainer.global_step = step
        curve.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, torch.zeros(2, 5), 0)
    assert trainer.loggers[0].logged == [
        (2, {"curve_loss": 2.0, "curve_samples": 4}),
        (4, {"curve_loss": 6.0, "curve_samples": 8}),
    ]
    with pytest.raises(ValueError, match=r"every.*0"):
        TrainingCurve(every=0)


def test_batch_statistics_uses_the_batch_and_keeps_the_running_statistics():
    import lightning as L

    from seqnorm.lightning import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(list("abcdefgh"), norm="batch", hidden_size=8, embedding_dim=4)
    with torch.no_grad():  # running statistics far from any batch's
        for name, buffer in model.named_buffers():
            if "running_mean" in name:
                buffer.fill_(3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randint(0, 8, (4, 11)) for _ in range(2)]

    def validate(*callbacks):
        trainer = L.Trainer(
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=list(callbacks),
        )
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        return trainer.validate(model, dataloaders=loader, verbose=False)[0]["val_loss"]

    running, batch_stats = validate(), validate(BatchStatistics())
    assert abs(running - batch_stats) > 1e-3  # the batch statistics were used
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert validate() == pytest.approx(running)  # and eval mode is back


def _check_quick(out, norms, rows):
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    sweep = json.loads((out / "study.json").read_text())["sweep"]
    assert sweep["batch_sizes"] == [1, 2, 8] and sweep["seeds"] == [0, 1]
    with open(out / "runs.csv") as f:
        table = list(csv.DictReader(f))
    # per norm and batch size: two tuning runs (seed 0) and seed 1 at the chosen rate; batch
    # norm at batch size 1 has its two tuning runs only, not applicable
    assert len(table) == len(rows) == 3 * len(norms) * 3 - (1 if "batch" in norms else 0)
    for row in table:
        if row["norm"] == "batch" and row["batch_size"] == "1":
            assert row["status"].startswith("n/a")  # reported, not a crash
            continue
        assert row["status"] == "ok" and math.isfinite(float(row["test_error"]))
        assert int(row["steps"]) * int(row["batch_size"]) == 64  # equal samples at every size
        assert (row["train_eval_gap"] != "") == (row["norm"] == "batch")
        run = (
            out
            / "runs"
            / study.run_name(
                row["norm"], int(row["batch_size"]), float(row["lr_multiplier"]), int(row["seed"])
            )
        )
        built = json.loads((run / "result.json").read_text())["hparams"]  # the run's model
        assert (built["norm"], built["lr"]) == (row["norm"], float(row["lr"]))
        assert sorted(p.name for p in run.iterdir()) == ["metrics.csv", "result.json"]
        assert report.read_curve(run / "metrics.csv")[-1][0] == 64
    summary = (out / "summary.md").read_text()
    assert "| batch | n/a |" in summary and "train/eval gap" in summary and "Tuning" in summary


@pytest.mark.slow
def test_quick_char_lm_writes_every_output_and_resumes(tmp_path, monkeypatch):
    config = os.path.join(ROOT, "configs", "study_char_lm_shakespeare.yaml")
    args = [
        "lm",
        "--config",
        config,
        "--data.init_args.path=null",  # Python's docs: offline
        "--sweep.quick=true",
        f"--sweep.out={tmp_path}",
    ]
    rows = study.main(args)
    _check_quick(tmp_path, ["none", "batch", "layer", "group"], rows)

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(study.Study, "_train", no_training)
    (tmp_path / "error_vs_batch.png").unlink()
    again = study.main(args)  # every run is read back
    assert again == rows
    assert (tmp_path / "error_vs_batch.png").stat().st_size > 0
    with pytest.raises(ValueError, match=r"other settings.*embedding_dim.*delete that folder"):
        study.main([*args, "--model.embedding_dim=16"])
    with pytest.raises(ValueError, match=r"other settings.*trainer.*gradient_clip_val"):
        study.main([*args, "--trainer.gradient_clip_val=0.5"])
    assert study.main([*args, "--trainer.enable_progress_bar=true"]) == rows  # display only
    (tmp_path / "summary.md").unlink()
    report.main([str(tmp_path)])  # the report alone, from the runs' files
    assert (tmp_path / "summary.md").read_text().count("±") >= 11

    # A grid run in parts: without training, the finished runs are reported, the rest not run
    for run in [
        *(tmp_path / "runs").glob("group-b8-*"),
        *(tmp_path / "runs").glob("layer-b8-*-s1"),
    ]:
        shutil.rmtree(run)
    part = study.main([*args, "--sweep.train=false"])
    removed = lambda s: (
        (s["norm"], s["batch_size"]) == ("group", 8)
        or ((s["norm"], s["batch_size"], s["seed"]) == ("layer", 8, 1))
    )
    assert part == [r for r in rows if not removed(r["settings"])]
    summary = (tmp_path / "summary.md").read_text()
    assert "Reported without training" in summary
    assert re.search(r"\| group \|[^\n]*\| not run \|\n", summary)
    assert re.search(r"\| layer \|[^\n]*\| \d+\.\d{3} \(1 seed so far\) \|\n", summary)
    assert not list((tmp_path / "runs").glob("group-b8-*"))


@pytest.mark.slow
def test_quick_classification_writes_every_output(tmp_path):
    tsv = tmp_path / "reviews.tsv"
    lines = [
        f"{i % 2}\t{'a fine good film' if i % 2 else 'a dull bad film'} {i}" for i in range(300)
    ]
    tsv.write_text("label\ttext\n" + "\n".join(lines) + "\n")
    out = tmp_path / "out"
    config = os.path.join(ROOT, "configs", "study_cls_mr_polarity.yaml")
    rows = study.main(
        [
            "classifier",
            "--config",
            config,
            f"--data.path={tsv}",
            "--sweep.quick=true",
            f"--sweep.out={out}",
        ]
    )
    _check_quick(out, ["none", "batch", "layer", "group"], rows)


def test_a_setting_that_exists_on_one_side_only_is_named():
    old = {"lr": 0.1, "data": {"path": "a.tsv", "gone": 3}}
    new = {"lr": 0.1, "data": {"path": "a.tsv", "added": None}}
    assert study._difference(old, new) == [
        "data.added: '(absent)' then, None now",
        "data.gone: 3 then, '(absent)' now",
    ]
    assert study._difference(old, old) == []


def test_quick_check_does_not_write_over_the_shipped_results():
    full = study.Sweep(out="results/batch_size_study/char_lm_shakespeare")
    quick = study.Sweep(out="results/batch_size_study/char_lm_shakespeare", quick=True)
    assert study.output_dir(full) == study.Path("results/batch_size_study/char_lm_shakespeare")
    assert study.output_dir(quick) == study.Path("runs/batch_size_study/char_lm_shakespeare")
    assert study.output_dir(study.Sweep(out="x/y", quick=True)) == study.Path("x/y")


def test_a_runs_commit_is_marked_changed_by_code_changes_not_by_results(tmp_path):
    def git(*args):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            check=True,
            capture_output=True,
        )

    assert study.git_commit(tmp_path) == "unknown"
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "result.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    commit = study.git_commit(tmp_path)
    assert len(commit) == 40
    (tmp_path / "results" / "result.json").unlink()  # a study replaces its results
    assert study.git_commit(tmp_path) == commit
    (tmp_path / "code.py").write_text("x = 2")
    assert study.git_commit(tmp_path) == commit + "+changes"


def test_report_needs_a_study_folder(tmp_path):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path)])


SHIPPED = sorted(glob.glob(os.path.join(ROOT, "results", "batch_size_study", "*", "study.json")))


@pytest.mark.slow
@pytest.mark.parametrize("described", SHIPPED, ids=[p.split(os.sep)[-2] for p in SHIPPED])
def test_every_shipped_study_reads_back_into_its_summary(described, tmp_path, monkeypatch):
    """Each results folder's runs, read back with the command that trained them (no training),
    give the summary shipped beside them: a setting added to a recipe since would otherwise make
    a finished study unreadable (it would not resume, nor could its report be redrawn)."""
    folder = os.path.dirname(described)
    command = shlex.split(json.loads(study.Path(described).read_text())["command"])
    assert command[:2] == ["python", "recipes/batch_size_study.py"]
    shutil.copytree(os.path.join(folder, "runs"), tmp_path / "runs")
    monkeypatch.chdir(ROOT)  # the commands name configs/ and data relative to the checkout

    def no_training(*a, **k):
        raise AssertionError("a shipped run was not read back")

    monkeypatch.setattr(study.Study, "_train", no_training)
    rows = study.main([*command[2:], "--sweep.train=false", f"--sweep.out={tmp_path}"])
    assert rows

    def without_command(path):
        text = study.Path(path).read_text()
        return re.sub(r"^Command: .*$", "", text, count=1, flags=re.M)

    assert without_command(tmp_path / "summary.md") == without_command(
        os.path.join(folder, "summary.md")
    )
