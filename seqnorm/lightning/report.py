"""The batch-size study's report, from the files its runs wrote (``recipes/batch_size_study.py``).

    python -m seqnorm.lightning.report results/batch_size_study/char_lm_shakespeare

Reads ``study.json`` (the command, the grid) and every ``runs/*/result.json`` and
``runs/*/metrics.csv``, and writes beside them:

    summary.md            the tables: test error (mean ± standard deviation over seeds) at the
                          chosen learning rate, batch norm's train/eval gap, the chosen rates,
                          the tuning errors, wall-clock time, and the command and commits
    runs.csv              one row per finished run
    error_vs_batch.png    test error against batch size (log2 axis), one line per norm
    learning_curves.png   training loss against samples seen at the chosen rates, a panel per
                          batch size
A study that has not finished yet is reported as far as it got.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path


def choose(tuning: list[dict]) -> float | None:
    """The learning-rate multiplier whose tuning run has the lowest validation error (the first
    of equals), or None when none finished with a finite error."""
    ok = [r for r in tuning if r["status"] == "ok" and math.isfinite(r["val_error"])]
    if not ok:
        return None
    return min(ok, key=lambda r: r["val_error"])["settings"]["lr_multiplier"]


def read_runs(out: Path) -> list[dict]:
    """Every finished run's result, with its learning curve (samples seen, mean loss)."""
    results = []
    for path in sorted(Path(out, "runs").glob("*/result.json")):
        result = json.loads(path.read_text())
        result["curve"] = read_curve(path.parent / "metrics.csv")
        results.append(result)
    return results


def read_curve(path: Path) -> list[tuple[int, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [
            (int(float(row["curve_samples"])), float(row["curve_loss"]))
            for row in csv.DictReader(f)
            if row.get("curve_loss")
        ]


def summarize(study: dict, results: list[dict]) -> dict:
    """(norm, batch) -> the cell: its tuning runs, the chosen multiplier and rate, the runs at
    the chosen rate, and their statistics; or its status ('n/a: ...', 'not run', 'diverged')."""
    sweep = study["sweep"]
    index = {}
    for r in results:
        s = r["settings"]
        index[s["norm"], s["batch_size"], s["lr_multiplier"], s["seed"]] = r
    cells = {}
    for norm in sweep["norms"]:
        for batch in sweep["batch_sizes"]:
            tuning = [
                index[k]
                for m in sweep["lr_multipliers"]
                if (k := (norm, batch, m, sweep["tune_seed"])) in index
            ]
            cell = {"tuning": tuning, "status": "not run"}
            cells[norm, batch] = cell
            if any(r["status"].startswith("n/a") for r in tuning):
                cell["status"] = tuning[0]["status"]
                continue
            if len(tuning) < len(sweep["lr_multipliers"]):
                continue
            chosen = choose(tuning)
            if chosen is None:
                cell["status"] = "diverged at every learning rate"
                continue
            runs = [
                index[k] for seed in sweep["seeds"] if (k := (norm, batch, chosen, seed)) in index
            ]
            tests = [r["test_error"] for r in runs]
            gaps = [r["train_eval_gap"] for r in runs if "train_eval_gap" in r]
            cell.update(
                status="ok" if len(runs) == len(sweep["seeds"]) else "partial",
                multiplier=chosen,
                lr=runs[0]["settings"]["lr"],
                runs=runs,
                mean=statistics.fmean(tests),
                std=statistics.stdev(tests) if len(tests) > 1 else 0.0,
                gap=statistics.fmean(gaps) if gaps else None,
                seconds=statistics.fmean(r["train_seconds"] for r in runs),
            )
    return cells


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cell_text(cell: dict, text) -> str:
    if cell["status"] not in ("ok", "partial"):
        return "n/a" if cell["status"].startswith("n/a") else cell["status"]
    n = len(cell["runs"])
    mark = "" if cell["status"] == "ok" else f" ({n} seed{'s' if n > 1 else ''} so far)"
    return text(cell) + mark


def tables(study: dict, cells: dict) -> str:
    sweep = study["sweep"]
    norms, batches = sweep["norms"], sweep["batch_sizes"]
    header = ["norm"] + [f"batch {b}" for b in batches]

    def rows(text):
        return [[n] + [_cell_text(cells[n, b], text) for b in batches] for n in norms]

    error = _table(
        header,
        rows(lambda c: f"{c['mean']:.3f}" + (f" ± {c['std']:.3f}" if len(c["runs"]) > 1 else "")),
    )
    edges = (min(sweep["lr_multipliers"]), max(sweep["lr_multipliers"]))
    rates = _table(
        header,
        rows(
            lambda c: (
                f"{c['lr']:.2e} (x{c['multiplier']:g}{', edge' if c['multiplier'] in edges else ''})"
            )
        ),
    )
    seconds = _table(header, rows(lambda c: f"{c['seconds']:.0f}"))
    gap_rows = (
        [["batch"] + [_cell_text(cells["batch", b], lambda c: f"{c['gap']:+.3f}") for b in batches]]
        if "batch" in norms
        else []
    )
    tuning_rows = []
    for n in norms:
        for b in batches:
            errors = {r["settings"]["lr_multiplier"]: r for r in cells[n, b]["tuning"]}
            tuning_rows.append(
                [f"{n}, batch {b}"]
                + [
                    f"{errors[m]['val_error']:.3f}"
                    if m in errors and errors[m]["status"] == "ok"
                    else ("n/a" if m in errors else "not run")
                    for m in sweep["lr_multipliers"]
                ]
            )
    tuning_header = ["norm, batch"] + [f"x{m:g}" for m in sweep["lr_multipliers"]]
    sections = [
        f"Test {study['metric']} at each cell's chosen learning rate, mean ± standard deviation "
        f"over seeds {sweep['seeds']}:\n\n{error}",
        "Batch norm's train/eval gap: the test error with running statistics minus with "
        f"batch statistics over batches of the training size:\n\n{_table(header, gap_rows)}"
        if gap_rows
        else "",
        "Chosen learning rate (the rule's rate times the multiplier; 'edge': the lowest or "
        f"highest multiplier of the grid, so the best rate may lie beyond it):\n\n{rates}",
        f"Training seconds per run (mean over seeds):\n\n{seconds}",
        f"Tuning: validation {study['metric']} of seed {sweep['tune_seed']} at each "
        f"multiplier of the rule's rate (the lowest is chosen):\n\n"
        f"{_table(tuning_header, tuning_rows)}",
    ]
    return "\n\n".join(s for s in sections if s)


def write(out) -> dict:
    """Write summary.md, runs.csv and the two figures into ``out``; return the cells."""
    out = Path(out)
    study = json.loads((out / "study.json").read_text())
    results = read_runs(out)
    cells = summarize(study, results)
    sweep = study["sweep"]
    commits = sorted({r["commit"] for r in results})
    trained = [r for r in results if r["status"] == "ok"]
    total = sum(r["train_seconds"] for r in trained)
    incomplete = any(c["status"] in ("not run", "partial") for c in cells.values())
    (out / "summary.md").write_text(
        f"# Batch-size study: {study['recipe']}, test {study['metric']}\n\n"
        f"Command: `{study['command']}`\n\nCommits of the runs: {', '.join(commits) or 'none'}\n\n"
        f"{sweep['samples']} training samples per run at every batch size; learning rate "
        f"{study['base_lr']:g} at batch {sweep['base_batch']}, scaled by rule "
        f"'{sweep['lr_rule']}', times each of {sweep['lr_multipliers']}, chosen per cell on the "
        f"validation split (seed {sweep['tune_seed']}); reported on the test split "
        f"({sweep['eval_samples']} samples at most). {len(trained)} runs, "
        f"{total / 3600:.2f} hours of training in all. The full config is in study.json.\n\n"
        + (
            ""
            if sweep.get("train", True) or not incomplete
            else "Reported without training (`--sweep.train false`): the same command without "
            "it trains the runs marked not run.\n\n"
        )
        + tables(study, cells)
        + "\n"
    )
    write_runs_csv(results, out / "runs.csv")
    plot_errors(study, cells, out / "error_vs_batch.png")
    plot_curves(study, cells, out / "learning_curves.png")
    return cells


def write_runs_csv(results: list[dict], path: Path) -> None:
    fields = [
        "norm",
        "batch_size",
        "lr_multiplier",
        "seed",
        "lr",
        "samples",
        "steps",
        "status",
        "val_error",
        "test_error",
        "test_error_batch_stats",
        "train_eval_gap",
        "train_seconds",
        "commit",
    ]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow({**r["settings"], **r})


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_errors(study: dict, cells: dict, path: Path) -> None:
    plt = _pyplot()
    sweep = study["sweep"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for norm in sweep["norms"]:
        points = [
            (b, cells[norm, b])
            for b in sweep["batch_sizes"]
            if cells[norm, b]["status"] in ("ok", "partial")
        ]
        if points:
            xs, cs = zip(*points)
            ax.errorbar(
                xs,
                [c["mean"] for c in cs],
                yerr=[c["std"] for c in cs],
                marker="o",
                capsize=3,
                label=norm,
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sweep["batch_sizes"], [str(b) for b in sweep["batch_sizes"]])
    ax.set_xlabel("batch size (same number of training samples)")
    ax.set_ylabel(f"test {study['metric']}")
    ax.set_title(f"mean ± std over {len(sweep['seeds'])} seeds, learning rate tuned per point")
    ax.legend(title="norm")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(study: dict, cells: dict, path: Path) -> None:
    plt = _pyplot()
    sweep = study["sweep"]
    batches = sweep["batch_sizes"]
    cols = min(4, len(batches))
    nrows = -(-len(batches) // cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False, sharey=True
    )
    colors = {norm: f"C{i}" for i, norm in enumerate(sweep["norms"])}  # the same in every panel
    for ax, batch in zip(axes.flat, batches):
        for norm in sweep["norms"]:
            cell = cells[norm, batch]
            curves = [r["curve"] for r in cell.get("runs", []) if r["curve"]]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            xs = [curves[0][i][0] for i in range(length)]
            ys = [statistics.fmean(c[i][1] for c in curves) for i in range(length)]
            ax.plot(xs, ys, color=colors[norm], label=norm)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("samples seen")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(batches) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("training loss (nats)")
    handles = [plt.Line2D([], [], color=colors[n], label=n) for n in sweep["norms"]]
    fig.legend(handles=handles, title="norm", loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="a study's results folder (holding study.json and runs/)")
    args = parser.parse_args(argv)
    if not Path(args.out, "study.json").is_file():
        parser.error(f"Expected a study's results folder, got {args.out!r}: it has no study.json")
    return write(args.out)


if __name__ == "__main__":
    main()
