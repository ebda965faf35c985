"""Batch-size study: batch norm against layer and group norm, from batch 64 down to pure SGD.

    python recipes/batch_size_study.py --config configs/study_char_lm_shakespeare.yaml
    python recipes/batch_size_study.py --config configs/study_char_lm_shakespeare.yaml --quick

Trains the same small model for every norm x batch size x seed with the same number of training
samples at every batch size (steps = samples / batch size), the learning rate set by a stated
rule, then measures validation error: bits per character for the character LM, error % for
classification. For batch norm it also measures the train/eval gap: the validation error with
the running statistics (eval mode, what a deployed model uses) minus the one with batch
statistics over batches of the training size (how the model saw data in training). Batch norm at
batch size 1 has no batch statistics; it is reported as not applicable. Writes to ``out`` (a
``--quick`` check of a config that writes under ``results/`` writes under ``runs/`` instead):

    runs.csv              one row per run
    summary.md            the table (mean and standard deviation over seeds) and the command
    val_vs_batch.png      validation error against batch size (log2 axis), one line per norm
    learning_curves.png   training loss against samples seen, one panel per batch size
    curves.json           the learning curves' numbers
"""

from __future__ import annotations

import copy
import csv
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser

from seqnorm.lightning import (
    CharLMDataModule,
    LanguageModel,
    SequenceClassifier,
    TextClassificationDataModule,
)
from seqnorm.norms import RecurrentBatchNorm

TASKS = ("char_lm", "classify")
LR_RULES = ("sqrt", "linear", "constant")


def parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--task", type=str, default="char_lm", help=f"one of {TASKS}")
    p.add_argument("--path", type=str | None, default=None, help="local data file")
    p.add_argument("--hub", type=str | None, default=None, help="Hugging Face data set name")
    p.add_argument("--hub_config", type=str | None, default=None)
    p.add_argument("--text_field", type=str, default="text")
    p.add_argument("--label_column", type=str, default="label")
    p.add_argument("--norms", type=list[str], default=["none", "batch", "layer", "group"])
    p.add_argument("--groups", type=int, default=4, help="groups of norm='group'")
    p.add_argument("--batch_sizes", type=list[int], default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--seeds", type=list[int], default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=4096, help="training samples per run")
    p.add_argument("--optimizer", type=str, default="adam", help="adam or sgd")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--base_lr", type=float, default=3e-3)
    p.add_argument("--base_batch", type=int, default=32)
    p.add_argument("--lr_rule", type=str, default="sqrt", help=f"one of {LR_RULES}")
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--embedding_dim", type=int, default=32)
    p.add_argument("--bptt", type=int, default=50, help="characters per sample (char_lm)")
    p.add_argument("--val_batch_size", type=int, default=32)
    p.add_argument("--val_samples", type=int, default=2048, help="validation samples (at most)")
    p.add_argument("--curve_points", type=int, default=16)
    p.add_argument("--out", type=str, default="results/batch_size_study")
    p.add_argument(
        "--quick", type=bool, default=False, help="a reduced grid (about 2 minutes on 2 cores)"
    )
    p.add_argument("--replot", type=bool, default=False, help="redraw the figures from `out`")
    return p


def learning_rate(args, batch: int) -> float:
    """The stated rule: base_lr at base_batch, scaled by sqrt(batch ratio), linearly, or not."""
    ratio = batch / args.base_batch
    return args.base_lr * {"sqrt": math.sqrt(ratio), "linear": ratio, "constant": 1.0}[args.lr_rule]


class Curve(L.Callback):
    """Training loss averaged over equal spans of samples seen: the learning curve."""

    def __init__(self, samples: int, points: int):
        self.span, self.points, self.acc = max(1, samples // points), [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = _batch_len(batch)
        self.acc.append((float(outputs["loss"]), n))
        seen = (trainer.global_step) * n
        if seen // self.span > len(self.points) and self.acc:
            total = sum(w for _, w in self.acc)
            self.points.append((seen, sum(v * w for v, w in self.acc) / total))
            self.acc = []


class BatchStatistics(L.Callback):
    """Validate with batch norm in training mode (batch statistics) without moving its running
    statistics: what the training loss saw, for the train/eval gap."""

    def on_validation_start(self, trainer, pl_module):
        self._saved = []
        for m in pl_module.modules():
            if isinstance(m, RecurrentBatchNorm):
                self._saved.append((m, m.momentum))
                m.momentum = 0.0  # the running statistics stay as they are
                m.train()

    def on_validation_end(self, trainer, pl_module):
        for m, momentum in self._saved:
            m.momentum = momentum


def _batch_len(batch) -> int:
    return int((batch[0] if isinstance(batch, (tuple, list)) else batch).shape[0])


class Study:
    """The data loaded once, then one training run per call."""

    def __init__(self, args):
        self.args = args
        if args.task == "char_lm":
            self.proto = CharLMDataModule(
                path=args.path, hub=args.hub, hub_config=args.hub_config,
                text_field=args.text_field, bptt=args.bptt,
            )  # fmt: skip
        else:
            self.proto = TextClassificationDataModule(
                path=args.path, hub=args.hub, hub_config=args.hub_config,
                text_column=args.text_field, label_column=args.label_column,
            )  # fmt: skip
        self.vocab = self.proto.vocab  # loads and tokenizes once; copies share it

    def data(self, batch: int):
        dm = copy.copy(self.proto)
        dm.batch_size = batch
        dm.setup("fit")
        return dm

    def model(self, norm: str, batch: int):
        a = self.args
        kw = dict(
            norm=norm, groups=a.groups if norm == "group" else 1, hidden_size=a.hidden_size,
            embedding_dim=a.embedding_dim, lr=learning_rate(a, batch), optimizer=a.optimizer,
            momentum=a.momentum,
        )  # fmt: skip
        if a.task == "char_lm":
            return LanguageModel(self.vocab, **kw)
        return SequenceClassifier(self.vocab, num_classes=self.proto.num_classes, **kw)

    def run(self, norm: str, batch: int, seed: int) -> dict:
        a = self.args
        row = {"norm": norm, "batch_size": batch, "seed": seed, "lr": learning_rate(a, batch),
               "optimizer": a.optimizer, "momentum": a.momentum, "samples": a.samples,
               "steps": a.samples // batch}  # fmt: skip
        if norm == "batch" and batch == 1:
            return {**row, "status": "n/a: batch norm has no batch statistics at batch size 1"}
        L.seed_everything(seed, verbose=False)
        model = self.model(norm, batch)
        curve = Curve(a.samples, a.curve_points)
        trainer = self._trainer(max_steps=a.samples // batch, callbacks=[curve])
        start = time.perf_counter()
        trainer.fit(model, train_dataloaders=self.data(batch).train_dataloader())
        row["train_seconds"] = time.perf_counter() - start
        row["val_error"] = self.validate(model, a.val_batch_size)
        if norm == "batch":
            row["val_error_batch_stats"] = self.validate(model, batch, BatchStatistics())
            row["train_eval_gap"] = row["val_error"] - row["val_error_batch_stats"]
        row["curve"] = curve.points
        return {**row, "status": "ok"}

    def validate(self, model, batch: int, *callbacks) -> float:
        """Bits per character, or error % for classification, on (up to) val_samples samples."""
        loader = self.data(batch).val_dataloader()
        # whole batches only: a last batch of one sample has no batch statistics
        items = len(loader.dataset) * (batch if self.args.task == "char_lm" else 1)
        limit = max(1, min(self.args.val_samples, items) // batch)
        trainer = self._trainer(limit_val_batches=limit, callbacks=list(callbacks))
        metrics = trainer.validate(model, dataloaders=loader, verbose=False)[0]
        if self.args.task == "char_lm":
            return float(metrics["val_bpc"])
        return 100 * (1 - float(metrics["val_acc"]))

    def _trainer(self, **kw) -> L.Trainer:
        kw.setdefault("limit_val_batches", 0)  # fit trains only; validate() measures
        return L.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
            gradient_clip_val=self.args.grad_clip, **kw,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    if args.task not in TASKS:
        raise ValueError(f"Expected argument `task` to be one of {TASKS}, got {args.task!r}")
    if args.lr_rule not in LR_RULES:
        raise ValueError(
            f"Expected argument `lr_rule` to be one of {LR_RULES}, got {args.lr_rule!r}"
        )
    if args.quick:  # a reduced grid that exercises every output
        args.batch_sizes = [b for b in args.batch_sizes if b in (1, 2, 8)] or args.batch_sizes[:2]
        args.seeds, args.samples = args.seeds[:2], 64
        args.hidden_size, args.val_samples, args.curve_points = 32, 64, 4
    out = output_dir(args)
    if args.replot:  # the figures again, from the runs.csv and curves.json a study wrote
        rows = read_results(out)
        plot_val(summarize(rows, args), args, out / "val_vs_batch.png")
        plot_curves(rows, args, out / "learning_curves.png")
        return rows
    out.mkdir(parents=True, exist_ok=True)
    study = Study(args)
    rows = []
    for batch in args.batch_sizes:
        for norm in args.norms:
            for seed in args.seeds:
                row = study.run(norm, batch, seed)
                rows.append(row)
                print(_describe(row), flush=True)
    command = "python recipes/batch_size_study.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    write_results(rows, args, out, command)
    return rows


def output_dir(args) -> Path:
    """``out``, except that a --quick check never overwrites a full study's shipped results: a
    path under ``results/`` becomes the same path under ``runs/``."""
    out = Path(args.out)
    if args.quick and out.parts[:1] == ("results",):
        return Path("runs", *out.parts[1:])
    return out


def _describe(row: dict) -> str:
    head = f"{row['norm']:>6} batch {row['batch_size']:>3} seed {row['seed']}"
    if row["status"] != "ok":
        return f"{head}: {row['status']}"
    gap = f", gap {row['train_eval_gap']:+.3f}" if "train_eval_gap" in row else ""
    return f"{head}: val {row['val_error']:.3f}{gap} ({row['train_seconds']:.1f} s)"


def write_results(rows: list[dict], args, out: Path, command: str) -> None:
    fields = ["norm", "batch_size", "seed", "status", "lr", "optimizer", "momentum", "samples",
              "steps", "val_error", "val_error_batch_stats", "train_eval_gap", "train_seconds"]  # fmt: skip
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    curves = [
        {k: r[k] for k in ("norm", "batch_size", "seed", "curve")}
        for r in rows
        if r["status"] == "ok"
    ]
    (out / "curves.json").write_text(json.dumps(curves))
    summary = summarize(rows, args)
    metric = "bits per character" if args.task == "char_lm" else "error %"
    (out / "summary.md").write_text(
        f"# Batch-size study: {args.task}, validation {metric}\n\n"
        f"Command: `{command}`\n\n"
        f"Data: {args.path or args.hub or 'default'}; {args.samples} training samples per run; "
        f"seeds {args.seeds}; optimizer {args.optimizer} (momentum {args.momentum}), learning rate "
        f"{args.base_lr} at batch {args.base_batch} scaled by rule '{args.lr_rule}'; hidden size "
        f"{args.hidden_size}. Mean ± standard deviation over seeds. The gap is batch norm's "
        "validation error with running statistics minus with batch statistics (batches of the "
        "training size).\n\n" + table(summary, args) + "\n"
    )
    plot_val(summary, args, out / "val_vs_batch.png")
    plot_curves(rows, args, out / "learning_curves.png")


def read_results(out: Path) -> list[dict]:
    """The rows of runs.csv (numbers parsed) with their learning curves from curves.json."""
    curves = {
        (c["norm"], c["batch_size"], c["seed"]): c["curve"]
        for c in json.loads((out / "curves.json").read_text())
    }
    rows = []
    with open(out / "runs.csv") as f:
        for raw in csv.DictReader(f):
            row = {k: v for k, v in raw.items() if v != ""}
            for key in ("batch_size", "seed", "samples", "steps"):
                row[key] = int(row[key])
            for key in (
                "lr",
                "momentum",
                "val_error",
                "val_error_batch_stats",
                "train_eval_gap",
                "train_seconds",
            ):
                if key in row:
                    row[key] = float(row[key])
            row["curve"] = curves.get((row["norm"], row["batch_size"], row["seed"]), [])
            rows.append(row)
    return rows


def summarize(rows: list[dict], args) -> dict:
    """(norm, batch) -> mean/std of val error and gap, mean seconds, or the n/a reason."""
    cells = {}
    for norm in args.norms:
        for batch in args.batch_sizes:
            runs = [r for r in rows if r["norm"] == norm and r["batch_size"] == batch]
            ok = [r for r in runs if r["status"] == "ok"]
            if not ok:
                cells[norm, batch] = {"status": runs[0]["status"] if runs else "not run"}
                continue
            vals = [r["val_error"] for r in ok]
            gaps = [r["train_eval_gap"] for r in ok if "train_eval_gap" in r]
            cells[norm, batch] = {
                "status": "ok", "mean": statistics.fmean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "gap": statistics.fmean(gaps) if gaps else None,
                "seconds": statistics.fmean(r["train_seconds"] for r in ok), "lr": ok[0]["lr"],
            }  # fmt: skip
    return cells


def table(cells: dict, args) -> str:
    lines = ["| norm | " + " | ".join(f"batch {b}" for b in args.batch_sizes) + " |",
             "|---|" + "---:|" * len(args.batch_sizes)]  # fmt: skip
    for norm in args.norms:
        row = []
        for b in args.batch_sizes:
            c = cells[norm, b]
            if c["status"] != "ok":
                row.append("n/a")
                continue
            text = f"{c['mean']:.3f} ± {c['std']:.3f}"
            if c["gap"] is not None:
                text += f" (gap {c['gap']:+.3f})"
            row.append(text)
        lines.append(f"| {norm} | " + " | ".join(row) + " |")
    seconds = [f"{statistics.fmean(c['seconds'] for (n, bb), c in cells.items() if bb == b and c['status'] == 'ok'):.1f}"
               if any(c["status"] == "ok" for (n, bb), c in cells.items() if bb == b) else "n/a"
               for b in args.batch_sizes]  # fmt: skip
    lines.append("| train seconds (mean) | " + " | ".join(seconds) + " |")
    lines.append(
        "| learning rate | "
        + " | ".join(f"{learning_rate(args, b):.2e}" for b in args.batch_sizes)
        + " |"
    )
    return "\n".join(lines)


def plot_val(cells: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for norm in args.norms:
        points = [(b, cells[norm, b]) for b in args.batch_sizes if cells[norm, b]["status"] == "ok"]
        if points:
            xs, cs = zip(*points)
            ax.errorbar(xs, [c["mean"] for c in cs], yerr=[c["std"] for c in cs], marker="o",
                        capsize=3, label=norm)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.batch_sizes, [str(b) for b in args.batch_sizes])
    ax.set_xlabel("batch size (same number of training samples)")
    ax.set_ylabel("validation " + ("bits per character" if args.task == "char_lm" else "error %"))
    ax.set_title(f"{args.task}: mean ± std over {len(args.seeds)} seeds")
    ax.legend(title="norm")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(rows: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(args.batch_sizes))
    nrows = -(-len(args.batch_sizes) // cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False, sharey=True
    )
    colors = {norm: f"C{i}" for i, norm in enumerate(args.norms)}  # the same in every panel
    for ax, batch in zip(axes.flat, args.batch_sizes):
        for norm in args.norms:
            runs = [
                r["curve"]
                for r in rows
                if r["norm"] == norm and r["batch_size"] == batch and r["status"] == "ok"
            ]
            runs = [c for c in runs if c]
            if not runs:
                continue
            length = min(len(c) for c in runs)
            xs = [runs[0][i][0] for i in range(length)]
            ys = [statistics.fmean(c[i][1] for c in runs) for i in range(length)]
            ax.plot(xs, ys, color=colors[norm], label=norm)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("samples seen")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(args.batch_sizes) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("training loss (nats)")
    handles = [plt.Line2D([], [], color=colors[n], label=n) for n in args.norms]
    fig.legend(handles=handles, title="norm", loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
