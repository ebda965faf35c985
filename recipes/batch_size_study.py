"""Batch-size study: batch norm against layer and group norm, from batch 64 down to pure SGD.

    python recipes/batch_size_study.py lm --config configs/study_char_lm_shakespeare.yaml
    python recipes/batch_size_study.py lm --config configs/study_char_lm_shakespeare.yaml --sweep.quick true
    python recipes/batch_size_study.py lm --config configs/study_char_lm_shakespeare.yaml --print_config
    python -m seqnorm.lightning.report results/batch_size_study/char_lm_shakespeare  # redraw

The first argument names the recipe (``lm``: ``recipes/train_lm.py``; ``classifier``:
``recipes/train_classifier.py``); the config is that recipe's YAML (``model``, ``data``,
``trainer``, ``seed_everything``) plus a ``sweep`` section. Every run is the recipe's model and
data with four settings changed: ``model.norm`` (and ``model.groups`` for the norms other than
group norm, which have one group), the batch size, the learning rate and the seed. Every run
trains on the same number of samples (steps = samples / batch size).

The learning rate of each norm x batch size comes from a grid: ``model.lr`` is the rate at
``sweep.base_batch``, scaled to the batch size by ``sweep.lr_rule`` and multiplied by each of
``sweep.lr_multipliers``; the multiplier with the lowest error on the validation split (the
tuning split, seed ``sweep.tune_seed``) is chosen, and the seeds run at it. What is reported is
the error on the test split, which the choice never saw. For batch norm the test error is also
measured with batch statistics over batches of the training size: the train/eval gap. Batch
norm at batch size 1 has no batch statistics and is reported as not applicable.

Each run writes ``out/runs/<norm>-b<batch>-lr<multiplier>-s<seed>/``: ``result.json`` once it
has finished (its errors, learning rate, steps and seconds) and ``metrics.csv`` (the learning
curve). A study that is stopped resumes where it stopped: finished runs are read back, not run
again, and a run whose settings no longer match the config is an error, never mixed in. The
study then writes the table, the tuning errors and the figures (``seqnorm.lightning.report``).
A ``--sweep.quick`` check of a config that writes under ``results/`` writes under ``runs/``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lightning import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger

from seqnorm.lightning import report
from seqnorm.lightning.callbacks import BatchStatistics, TrainingCurve
from seqnorm.lightning.cli import LMCLI, ClassifierCLI

LR_RULES = ("sqrt", "linear", "constant")
# Trainer settings that do not change what a run learns (display, files, validation during fit,
# which the study turns off, and the length, which the sweep sets); the others are part of a run.
TRAINER_DISPLAY_AND_FILES = (
    "logger", "callbacks", "enable_progress_bar", "enable_model_summary", "enable_checkpointing",
    "default_root_dir", "log_every_n_steps", "enable_autolog_hparams", "model_registry",
    "profiler", "max_steps", "limit_val_batches", "num_sanity_val_steps", "val_check_interval",
    "check_val_every_n_epoch",
)  # fmt: skip
# Data settings that training never reads (the documents `predict` classifies)
DATA_NOT_TRAINED_ON = ("predict_path",)
NORMS = ("none", "batch", "layer", "group")


@dataclass
class Sweep:
    """The study's grid (the ``sweep`` section of a study config).

    Args:
        norms: the normalizations compared.
        batch_sizes: the batch sizes, each trained on the same number of samples.
        seeds: the seeds run at each norm x batch size's chosen learning rate.
        samples: training samples per run (windows of the LM's ``bptt`` tokens, or sentences).
        base_batch: the batch size at which the learning rate is ``model.lr``.
        lr_rule: how the rate scales with the batch size: ``sqrt`` (by the square root of
            batch / base_batch), ``linear`` or ``constant``.
        lr_multipliers: the grid around the rule's rate; the best on the tuning split is chosen.
        tune_seed: the seed of the tuning runs (its run at the chosen rate is one of ``seeds``).
        eval_samples: validation and test samples per evaluation (at most the split).
        eval_batch_size: the batch size of evaluation with running statistics.
        curve_points: points of each run's learning curve.
        out: the results folder.
        quick: a reduced grid and model that exercise every output in about two minutes.
        train: False trains nothing: the finished runs are read and the report of the whole
            grid is written, the rest marked not run (a grid run in parts, for example
            ``--sweep.batch_sizes '[64]'`` on one machine and the others elsewhere, is reported
            whole this way).
    """

    norms: list[str] = field(default_factory=lambda: list(NORMS))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    samples: int = 4096
    base_batch: int = 32
    lr_rule: str = "sqrt"
    lr_multipliers: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    tune_seed: int = 0
    eval_samples: int = 2048
    eval_batch_size: int = 32
    curve_points: int = 32
    out: str = "results/batch_size_study"
    quick: bool = False
    train: bool = True


def check_sweep(sweep: Sweep) -> None:
    """Clear errors for a grid that cannot run, before anything is trained."""

    def fail(name, expected):
        raise ValueError(f"Expected `sweep.{name}` {expected}, got {getattr(sweep, name)!r}")

    if not sweep.norms or any(n not in NORMS for n in sweep.norms):
        fail("norms", f"to be a non-empty list of {NORMS}")
    if not sweep.batch_sizes or any(b < 1 for b in sweep.batch_sizes):
        fail("batch_sizes", "to be a non-empty list of whole numbers >= 1")
    if not sweep.seeds:
        fail("seeds", "to be a non-empty list")
    if sweep.samples < max(sweep.batch_sizes):
        fail("samples", f"to be at least the largest batch size, {max(sweep.batch_sizes)}")
    if sweep.lr_rule not in LR_RULES:
        fail("lr_rule", f"to be one of {LR_RULES}")
    if not sweep.lr_multipliers or any(not m > 0 for m in sweep.lr_multipliers):
        fail("lr_multipliers", "to be a non-empty list of positive numbers")
    if sweep.tune_seed not in sweep.seeds:
        fail("tune_seed", f"to be one of the seeds {sweep.seeds}")
    for name in ("base_batch", "eval_samples", "eval_batch_size", "curve_points"):
        if getattr(sweep, name) < 1:
            fail(name, "to be a whole number >= 1")


def learning_rate(base_lr: float, sweep: Sweep, batch: int, multiplier: float = 1.0) -> float:
    """The rule's rate at ``batch`` times ``multiplier``."""
    ratio = batch / sweep.base_batch
    scale = {"sqrt": math.sqrt(ratio), "linear": ratio, "constant": 1.0}[sweep.lr_rule]
    return base_lr * scale * multiplier


def run_name(norm: str, batch: int, multiplier: float, seed: int) -> str:
    return f"{norm}-b{batch}-lr{multiplier:g}-s{seed}"


class _SweepArguments:
    """Adds the ``sweep`` section to a recipe's LightningCLI. The classes are built per run
    (``Study.run``), not once when the command line is parsed."""

    def add_arguments_to_parser(self, parser):
        super().add_arguments_to_parser(parser)
        parser.add_class_arguments(Sweep, "sweep")

    def instantiate_classes(self) -> None:
        pass


class LMStudyCLI(_SweepArguments, LMCLI):
    """``recipes/train_lm.py``'s command line with a sweep."""


class ClassifierStudyCLI(_SweepArguments, ClassifierCLI):
    """``recipes/train_classifier.py``'s command line with a sweep."""


RECIPES = {"lm": LMStudyCLI, "classifier": ClassifierStudyCLI}


class Study:
    """The grid of one study config: tuning runs, then the seeds at each chosen rate."""

    def __init__(self, cli, command: str):
        self.cli, self.command = cli, command
        self.config = cli.config
        self.sweep = Sweep(**self.config.sweep.as_dict())
        if self.sweep.quick:  # a reduced grid that exercises every output
            s = self.sweep
            s.batch_sizes = [b for b in s.batch_sizes if b in (1, 2, 8)] or s.batch_sizes[:2]
            s.seeds, s.samples, s.eval_samples, s.curve_points = s.seeds[:2], 64, 64, 4
            s.lr_multipliers = s.lr_multipliers[:2]
            s.tune_seed = s.seeds[0]
            self.config.model.hidden_size = 32
        check_sweep(self.sweep)
        self.out = output_dir(self.sweep)
        self.base_lr = self.config.model.lr
        self.lm = isinstance(self.cli, LMCLI)

    def _run_config(self, norm: str, batch: int, multiplier: float, seed: int):
        cfg = copy.deepcopy(self.config)
        cfg.model.norm = norm
        if norm != "group":
            cfg.model.groups = 1
        cfg.model.lr = learning_rate(self.base_lr, self.sweep, batch, multiplier)
        self._data_args(cfg).batch_size = batch
        cfg.seed_everything = seed
        return cfg

    def _data_args(self, cfg):
        return cfg.data.init_args if self.lm else cfg.data

    def settings(self, norm: str, batch: int, multiplier: float, seed: int) -> dict:
        """What a finished run must have been trained with to be read back."""
        return {
            "norm": norm,
            "batch_size": batch,
            "lr_multiplier": multiplier,
            "seed": seed,
            "lr": learning_rate(self.base_lr, self.sweep, batch, multiplier),
            "samples": self.sweep.samples,
            "steps": self.sweep.samples // batch,
            "model": self._run_config(norm, batch, multiplier, seed).model.as_dict(),
            "data": {
                k: v
                for k, v in self._data_args(self.config).as_dict().items()
                if k not in DATA_NOT_TRAINED_ON
            }
            | {"batch_size": batch},
            "trainer": {
                k: v
                for k, v in self.config.trainer.as_dict().items()
                if k not in TRAINER_DISPLAY_AND_FILES
            },
            "eval_samples": self.sweep.eval_samples,
            "eval_batch_size": self.sweep.eval_batch_size,
        }

    def run(self, norm: str, batch: int, multiplier: float, seed: int) -> dict | None:
        """One run's result: read back if it has finished, trained and evaluated otherwise
        (None without ``sweep.train``)."""
        directory = self.out / "runs" / run_name(norm, batch, multiplier, seed)
        settings = self.settings(norm, batch, multiplier, seed)
        done = directory / "result.json"
        if done.exists():
            result = json.loads(done.read_text())
            if result["settings"] != json.loads(json.dumps(settings)):
                raise ValueError(
                    f"{str(done)!r} was trained with other settings than the config now asks for "
                    f"({'; '.join(_difference(result['settings'], settings)[:3])}); delete that folder to run "
                    "it again, or give the study another `sweep.out`"
                )
            return result
        if not self.sweep.train:
            return None
        shutil.rmtree(directory, ignore_errors=True)  # what a killed run left behind
        result = {"settings": settings, "status": "ok"}
        if norm == "batch" and batch == 1:
            result["status"] = "n/a: batch norm has no batch statistics at batch size 1"
        else:
            result.update(self._train(directory, norm, batch, multiplier, seed))
        result["commit"] = git_commit()
        directory.mkdir(parents=True, exist_ok=True)
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, done)  # a run killed while writing leaves no result behind
        return result

    def _train(self, directory: Path, norm: str, batch: int, multiplier: float, seed: int):
        cli = self.cli
        cli.config = self._run_config(norm, batch, multiplier, seed)
        seed_everything(seed, workers=True, verbose=False)  # before the weights are drawn
        # jsonargparse >= 4.49 names it `instantiate`; `instantiate_classes` is deprecated there
        instantiate = getattr(cli.parser, "instantiate", None) or cli.parser.instantiate_classes
        cli.config_init = instantiate(cli.config)
        model, data = cli.config_init.model, cli.config_init.data
        every = max(1, self.sweep.samples // self.sweep.curve_points)
        logger = CurveLogger(directory, name="", version="")
        callbacks = list(cli.config_init.trainer.get("callbacks") or [])
        trainer = cli.instantiate_trainer(
            max_steps=self.sweep.samples // batch,
            logger=logger,
            callbacks=[*callbacks, TrainingCurve(every)],
            limit_val_batches=0,
            enable_checkpointing=False,
            default_root_dir=str(directory),
        )
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        result = {"train_seconds": time.perf_counter() - start, "steps_done": trainer.global_step}
        # what the run's model was built with (the vocabulary and label names left out)
        result["hparams"] = {
            k: v for k, v in model.hparams.items() if k not in ("vocab", "label_names")
        }
        result["val_error"] = self.evaluate(model, data, "val")
        result["test_error"] = self.evaluate(model, data, "test")
        if norm == "batch":
            result["test_error_batch_stats"] = self.evaluate(model, data, "test", batch)
            result["train_eval_gap"] = result["test_error"] - result["test_error_batch_stats"]
        result["metric"] = "bits per character" if self.lm else "error %"
        return result

    def evaluate(self, model, data, split: str, batch_stats_batch: int | None = None) -> float:
        """Bits per character, or error % for classification, on (up to) ``eval_samples``
        samples of ``split``, with running statistics, or with batch statistics over batches of
        ``batch_stats_batch`` samples."""
        batch = batch_stats_batch or self.sweep.eval_batch_size
        data = copy.copy(data)
        data.batch_size = batch
        data.setup("fit" if split == "val" else "test")
        loader = data.val_dataloader() if split == "val" else data.test_dataloader()
        # whole batches only: a last batch of one sample has no batch statistics
        items = len(loader.dataset) * (batch if self.lm else 1)
        limit = max(1, min(self.sweep.eval_samples, items) // batch)
        trainer = Trainer(
            accelerator=self.config.trainer.accelerator,
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=limit,
            limit_test_batches=limit,
            callbacks=[BatchStatistics()] if batch_stats_batch else [],
        )
        run = trainer.validate if split == "val" else trainer.test
        metrics = run(model, dataloaders=loader, verbose=False)[0]
        if self.lm:
            return float(metrics[f"{split}_bpc"])
        return 100 * (1 - float(metrics[f"{split}_acc"]))

    def cells(self):
        return [(n, b) for b in self.sweep.batch_sizes for n in self.sweep.norms]

    def run_all(self) -> list[dict]:
        """Every cell: the tuning runs, the choice, the seeds at the choice; then the report."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "study.json").write_text(json.dumps(self.description(), indent=1))
        results = []
        for norm, batch in self.cells():
            tuning = [
                self.run(norm, batch, m, self.sweep.tune_seed) for m in self.sweep.lr_multipliers
            ]
            finished = [r for r in tuning if r is not None]
            for r in finished:
                print(_describe(r), flush=True)
            results += finished
            chosen = report.choose(tuning) if len(finished) == len(tuning) else None
            if chosen is None:
                continue
            for seed in self.sweep.seeds:
                if seed != self.sweep.tune_seed and (r := self.run(norm, batch, chosen, seed)):
                    results.append(r)
                    print(_describe(r), flush=True)
        report.write(self.out)
        return results

    def description(self) -> dict:
        return {
            "command": self.command,
            "commit": git_commit(),
            "recipe": "lm" if self.lm else "classifier",
            "metric": "bits per character" if self.lm else "error %",
            "sweep": asdict(self.sweep),
            "base_lr": self.base_lr,
            "config": self.cli.parser.dump(self.config, skip_validation=True),
        }


class CurveLogger(CSVLogger):
    """A run's learning curve (``metrics.csv``) without ``hparams.yaml``: the run's settings
    are in its ``result.json``, and the hyperparameters would repeat the vocabulary in every
    run's folder."""

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def output_dir(sweep: Sweep) -> Path:
    """``sweep.out``, except that a quick check never writes over a full study's shipped
    results: a path under ``results/`` becomes the same path under ``runs/``."""
    out = Path(sweep.out)
    if sweep.quick and out.parts[:1] == ("results",):
        return Path("runs", *out.parts[1:])
    return out


def git_commit(root: Path | None = None) -> str:
    """The checkout's commit, with ``+changes`` when tracked files outside ``results/`` differ
    from it (a study's own results do not change the code that trains); ``unknown`` outside a
    git checkout."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def _difference(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The settings that differ, as ``name: old then, new now``, nested names dotted."""
    new, changes = json.loads(json.dumps(new)), []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _difference(a, b, f"{prefix}{key}.")
        elif a != b or (key in old) != (key in new):
            changes.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return changes


def _describe(result: dict) -> str:
    s = result["settings"]
    head = f"{s['norm']:>6} batch {s['batch_size']:>3} lr {s['lr']:.2e} seed {s['seed']}"
    if result["status"] != "ok":
        return f"{head}: {result['status']}"
    gap = f", gap {result['train_eval_gap']:+.3f}" if "train_eval_gap" in result else ""
    return (
        f"{head}: val {result['val_error']:.3f}, test {result['test_error']:.3f}{gap} "
        f"({result['train_seconds']:.1f} s)"
    )


def main(argv: list[str] | None = None) -> list[dict] | None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # a Trainer per run
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in RECIPES:
        raise SystemExit(
            f"usage: batch_size_study.py {{{','.join(RECIPES)}}} --config STUDY.yaml [...]\n"
            f"Expected the recipe ({' or '.join(RECIPES)}) as the first argument, got "
            f"{argv[0] if argv else 'nothing'!r}"
        )
    # Without load_from_checkpoint_support: it would save the hyperparameters parsed first in
    # every run's model, not the run's own (its learning rate, its norm).
    cli = RECIPES[argv[0]](
        args=argv[1:], run=False, save_config_callback=None, load_from_checkpoint_support=False
    )
    command = "python recipes/batch_size_study.py " + shlex.join(argv)
    return Study(cli, command).run_all()


if __name__ == "__main__":
    main()
