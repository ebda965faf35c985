"""The Lightning recipes: configs, training, resume, DDP, generation and bad input."""

import glob
import os
import re
import subprocess
import sys
import warnings
from types import SimpleNamespace

import datasets
import pytest
import torch
from torch.testing import assert_close

import seqnorm

pytest.importorskip("lightning")

import lightning as L

from seqnorm.lightning import (
    CharLMDataModule,
    LanguageModel,
    SequenceClassifier,
    TextClassificationDataModule,
)
from seqnorm.lightning import data as data_module
from seqnorm.lightning.callbacks import WritePredictions
from seqnorm.norms import RecurrentBatchNorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes"))
import generate  # noqa: E402
import train_classifier  # noqa: E402
import train_lm  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 200
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.fixture
def tsv_file(tmp_path):
    path = tmp_path / "reviews.tsv"
    rows = [
        f"{i % 2}\t{'a fine good film' if i % 2 else 'a dull bad film'} number {i}"
        for i in range(200)
    ]
    path.write_text("label\ttext\n" + "\n".join(rows) + "\n")
    return str(path)


def fake_hub(name, config=None):
    """What the hub would return, made here: the configs are instantiated without downloading."""
    rows = {"text": ["some text here"] * 50, "sentence": ["a sentence"] * 50, "label": [0, 1] * 25}
    split = datasets.Dataset.from_dict(rows)
    return datasets.DatasetDict({"train": split, "validation": split, "test": split})


CONFIGS = sorted(
    c
    for c in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
    if not os.path.basename(c).startswith("study_")  # the batch-size study's: tests/test_study.py
)


@pytest.mark.parametrize("config", CONFIGS, ids=[os.path.basename(c)[:-5] for c in CONFIGS])
def test_every_config_parses_and_instantiates(config, monkeypatch, text_file, tsv_file):
    monkeypatch.setattr(data_module, "load_hub", fake_hub)
    with open(config) as f:
        first = f.readline()
    assert first.startswith("# python recipes/"), "each config starts with the command that runs it"
    recipe = train_lm if "train_lm.py" in first else train_classifier
    args = ["--config", config]
    if "local" in config:
        args += [f"--data.init_args.path={text_file}"]
    if "mr_polarity" in config:
        args += [f"--data.path={tsv_file}"]
    cli = recipe.main(args, run=False)
    assert len(cli.model.vocab) > 3
    assert sum(p.numel() for p in cli.model.parameters()) > 0
    expected = first.split("--config ")[1].split()[0]
    assert os.path.basename(expected) == os.path.basename(config)


@pytest.mark.parametrize("config", CONFIGS, ids=[os.path.basename(c)[:-5] for c in CONFIGS])
def test_every_config_resolves_with_its_command_and_print_config(config, capsys):
    """The first line's command, plus --print_config, prints the whole resolved config."""
    with open(config) as f:
        command = f.readline().removeprefix("# ").split()
    recipe = train_lm if command[1] == "recipes/train_lm.py" else train_classifier
    args = [os.path.join(ROOT, a) if a.startswith("configs/") else a for a in command[2:]]
    with pytest.raises(SystemExit) as exit_:
        recipe.main([*args, "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "trainer:" in printed


@pytest.mark.parametrize(
    "recipe, offered",
    [(train_lm, "{fit,validate,test}"), (train_classifier, "{fit,validate,test,predict}")],
    ids=["lm", "classifier"],
)
def test_the_command_line_offers_the_subcommands_the_data_serves(recipe, offered, capsys):
    """fit, validate and test, and predict for the classifier; the language model's data has no
    prediction split, so its parser refuses predict (Lightning's error would come after building
    the model and data)."""
    with pytest.raises(SystemExit) as exit_:
        recipe.main(["--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    assert offered in usage
    if recipe is train_lm:
        with pytest.raises(SystemExit) as exit_:
            recipe.main(["predict"])
        assert exit_.value.code != 0
        assert "predict" in capsys.readouterr().err


@pytest.mark.slow
def test_classifier_predict_writes_each_document_with_its_label(tsv_file, tmp_path, capsys):
    """predict on a trained checkpoint: predictions.tsv holds every line of predict_path, in
    order, with the class the model gives it (against the model run from Python); without a
    predict_path the error names the argument before anything runs."""
    args = [
        "--config",
        os.path.join(ROOT, "configs", "cls_mr_polarity_ln_lstm.yaml"),
        f"--data.path={tsv_file}",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        f"--trainer.default_root_dir={tmp_path}",
        "--model.hidden_size=8",
        *QUIET,
    ]
    cli = train_classifier.main(
        ["fit", *args, "--trainer.max_steps=3", "--trainer.limit_val_batches=0"]
    )
    ckpt = tmp_path / "model.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    docs = ["a fine good film", "a dull bad film", "", "words never seen before", "bad bad bad"]
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n")
    train_classifier.main(
        ["predict", *args, f"--ckpt_path={ckpt}", f"--data.predict_path={tmp_path / 'docs.txt'}"]
    )
    assert f"predictions: {tmp_path / 'predictions.tsv'}" in capsys.readouterr().out
    rows = [line.split("\t", 1) for line in (tmp_path / "predictions.tsv").read_text().splitlines()]
    assert [doc for _, doc in rows] == docs
    model = SequenceClassifier.load_from_checkpoint(ckpt).eval()
    dm = TextClassificationDataModule(path=tsv_file, predict_path=str(tmp_path / "docs.txt"))
    dm.setup()
    with torch.no_grad():
        want = [
            label for batch in dm.predict_dataloader() for label in model.predict_step(batch, 0)
        ]
    assert [label for label, _ in rows] == want and set(want) <= {"0", "1"}
    with pytest.raises(ValueError, match="Expected argument `predict_path`"):
        train_classifier.main(["predict", *args, f"--ckpt_path={ckpt}"])


def test_predictions_are_written_beside_the_documents_the_loader_read(tsv_file, tmp_path):
    """WritePredictions pairs each prediction with the document the predict loader read, not
    with the file read again: a predict_path rewritten meanwhile (with as many lines) cannot put
    the labels beside other documents. Before the loader has read them, it says what it needs."""
    path = tmp_path / "docs.txt"
    path.write_text("a fine film\na bad film\n")
    dm = TextClassificationDataModule(path=tsv_file, predict_path=str(path))
    dm.setup()
    out = tmp_path / "predictions.tsv"
    trainer = SimpleNamespace(datamodule=dm)
    with pytest.raises(RuntimeError, match="predict loader read: predict with that data module"):
        WritePredictions(str(out)).write_on_epoch_end(trainer, None, [["1", "0"]], None)
    assert sum(len(batch[0]) for batch in dm.predict_dataloader()) == 2
    path.write_text("other words\nmore words\n")
    WritePredictions(str(out)).write_on_epoch_end(trainer, None, [["1", "0"]], None)
    assert out.read_text() == "1\ta fine film\n0\ta bad film\n"


def lm_args(text_file, tmp_path, *extra):
    return [
        "fit",
        "--config",
        os.path.join(ROOT, "configs", "char_lm_pydoc_ln_lstm.yaml"),
        f"--data.init_args.path={text_file}",
        "--data.init_args.batch_size=4",
        "--data.init_args.bptt=20",
        "--model.hidden_size=32",
        "--model.embedding_dim=8",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        *QUIET,
        *extra,
    ]


def test_lm_recipe_fast_dev_run(text_file, tmp_path):
    cli = train_lm.main(lm_args(text_file, tmp_path, "--trainer.fast_dev_run=true"))
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train_loss_step"])


def test_bf16_mixed_precision_on_cpu_runs_the_cpp_kernel(text_file, tmp_path, monkeypatch):
    """Lightning's precision="bf16-mixed" on a CPU is CPU autocast: the C++ kernel runs it (in
    float32), with no fallback to the Python loop (its warning, once per reason, is an error)."""
    from seqnorm.ops import backend

    monkeypatch.setattr(backend, "_warned", set())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="seqnorm runs the per-step Python loop")
        cli = train_lm.main(
            lm_args(
                text_file, tmp_path, "--trainer.fast_dev_run=true", "--trainer.precision=bf16-mixed"
            )
        )
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train_loss_step"])


@pytest.mark.slow
def test_local_lm_config_trains_on_a_small_file(text_file, tmp_path, monkeypatch):
    """The README's own-text command, config as shipped: a file of a few dozen batches validates and
    checkpoints within its epoch (a step-count interval longer than the epoch used to fail)."""
    monkeypatch.chdir(tmp_path)  # the config writes to runs/ under the working directory
    args = [
        "fit",
        "--config",
        os.path.join(ROOT, "configs", "char_lm_local_ln_lstm.yaml"),
        f"--data.init_args.path={text_file}",
        "--data.init_args.batch_size=8",
        "--data.init_args.bptt=40",
        "--model.hidden_size=16",
        *QUIET,
    ]
    cli = train_lm.main(args)
    assert cli.trainer.num_training_batches < 500
    assert "val_bpc" in cli.trainer.callback_metrics
    saved = os.listdir(tmp_path / "runs" / "char_lm_local_ln_lstm" / "checkpoints")
    assert "last.ckpt" in saved and len(saved) == 2, saved  # the last and the best


def test_classifier_recipe_fast_dev_run(tsv_file, tmp_path):
    args = [
        "fit",
        "--config",
        os.path.join(ROOT, "configs", "cls_mr_polarity_ln_lstm.yaml"),
        f"--data.path={tsv_file}",
        "--trainer.fast_dev_run=true",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        f"--trainer.default_root_dir={tmp_path}",
        "--model.hidden_size=16",
        *QUIET,
    ]
    cli = train_classifier.main(args)
    assert cli.trainer.global_step == 1
    assert 0 <= float(cli.trainer.callback_metrics["val_acc"]) <= 1
    assert cli.model.label_names == ["0", "1"]


@pytest.mark.slow
def test_char_lm_overfits_a_tiny_corpus(text_file, tmp_path):
    cli = train_lm.main(
        lm_args(
            text_file,
            tmp_path,
            "--trainer.max_steps=150",
            "--trainer.limit_val_batches=0",
            "--model.lr=0.01",
        )
    )
    loss = float(cli.trainer.callback_metrics["train_loss_step"])
    # A uniform guess over the 29 characters costs ln(29) = 3.37 nats; the repeated sentence is learnable.
    assert loss < 0.5, loss


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_resume_mid_epoch_continues_the_same_run(text_file, tmp_path, norm):
    """Killed at step 7 of 12 and resumed from its checkpoint = never interrupted."""

    def fit(root, max_steps, ckpt_path=None):
        ckpt = {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(root), "every_n_train_steps": 7, "save_top_k": -1},
        }
        args = lm_args(
            text_file,
            root,
            f"--trainer.max_steps={max_steps}",
            "--trainer.limit_val_batches=0",
            f"--model.norm={norm}",
            f"--trainer.callbacks=[{ckpt}]",
        )
        args[args.index("--trainer.callbacks=[]")] = "--trainer.max_epochs=1"
        if ckpt_path:
            args.append(f"--ckpt_path={ckpt_path}")
        return train_lm.main(args).model

    straight = fit(tmp_path / "straight", 12)
    fit(tmp_path / "broken", 7)
    (checkpoint,) = glob.glob(str(tmp_path / "broken" / "*step=7.ckpt"))
    resumed = fit(tmp_path / "resumed", 12, checkpoint)
    assert_close(resumed.state_dict(), straight.state_dict(), rtol=0, atol=0)


def test_resuming_with_another_cut_of_the_stream_warns(text_file, tmp_path):
    """The loader's saved position counts windows of the checkpoint's layout: with another batch
    size the run goes on elsewhere in the data, which it says; with the same one it says nothing."""
    steps = ("--trainer.max_steps=2", "--trainer.limit_val_batches=0")
    cli = train_lm.main(lm_args(text_file, tmp_path, *steps))
    path = str(tmp_path / "model.ckpt")
    cli.trainer.save_checkpoint(path)
    resume = lm_args(text_file, tmp_path, "--trainer.max_steps=3", steps[1], f"--ckpt_path={path}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_lm.main(resume)
    assert not [w for w in caught if "another cut" in str(w.message)]
    resume[resume.index("--data.init_args.batch_size=4")] = "--data.init_args.batch_size=2"
    with pytest.warns(
        UserWarning, match=r"another cut of the training stream \(batch_size=4 then, 2 now\)"
    ):
        train_lm.main(resume)


@pytest.mark.slow
def test_generate_from_a_saved_checkpoint(text_file, tmp_path):
    cli = train_lm.main(
        lm_args(text_file, tmp_path, "--trainer.max_steps=3", "--trainer.limit_val_batches=0")
    )
    path = str(tmp_path / "model.ckpt")
    cli.trainer.save_checkpoint(path)
    text = generate.main([path, "--prompt", "the ", "--length", "40", "--seed", "1"])
    assert text.startswith("the ") and len(text) == 44
    assert set(text) <= set(TEXT)
    loaded = LanguageModel.load_from_checkpoint(path)  # the checkpoint alone: vocabulary included
    assert loaded.vocab == cli.model.vocab
    tokens = torch.randint(1, len(loaded.vocab), (2, 7))
    cli.model.eval()
    assert_close(loaded(tokens)[0], cli.model(tokens)[0])
    assert loaded.generate("the ", 40, seed=1) == loaded.generate("the ", 40, seed=1)


def _synced_batch_norm(rank, world, port, x, results):
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}"
    )
    torch.manual_seed(0)
    bn = RecurrentBatchNorm(3, max_steps=5, sync=True)
    half = x.shape[1] // world
    y = bn(x[:, rank * half : (rank + 1) * half])
    results[rank] = (y.detach(), bn.running_mean.clone())
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_batch_norm_statistics_sync_across_two_processes():
    """Two gloo processes with half the batch each normalize as one process with all of it."""
    import torch.multiprocessing as mp

    x = torch.randn(4, 6, 3)
    results = mp.Manager().dict()
    port = 29500 + os.getpid() % 1000
    mp.spawn(_synced_batch_norm, args=(2, port, x, results), nprocs=2)
    whole = RecurrentBatchNorm(3, max_steps=5)
    want = whole(x)
    assert_close(torch.cat([results[0][0], results[1][0]], dim=1), want)
    assert_close(results[0][1], whole.running_mean)


@pytest.mark.slow
def test_ddp_two_processes(text_file, tmp_path):
    args = lm_args(
        text_file,
        tmp_path,
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=2",
        "--model.norm=batch",
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.val_check_interval=2",
        "--trainer.accelerator=cpu",
    )
    # the recipe runs in tmp_path: it imports the seqnorm under test even where that is found
    # through a relative PYTHONPATH (PYTHONPATH=. on a machine without the package installed)
    tested = os.path.dirname(os.path.dirname(os.path.abspath(seqnorm.__file__)))
    pythonpath = os.pathsep.join(p for p in (tested, os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "recipes", "train_lm.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)
    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] >= 2  # saved at the validation of step 2
    running = saved["state_dict"]["rnn.norm_hh_l0.running_mean"]
    assert running[:3].abs().sum() > 0 and torch.isfinite(running).all()  # statistics moved


def missing_file(p):
    return CharLMDataModule(path=str(p / "missing.txt")).vocab


def empty_file(p):
    (p / "empty.txt").write_text("")
    return CharLMDataModule(path=str(p / "empty.txt")).vocab


def missing_column(p):
    return TextClassificationDataModule(path=str(p / "reviews.tsv"), text_column="review").vocab


def label_out_of_range(p):
    (p / "reviews.tsv").write_text("label\ttext\n" + "3\tbad\n0\tgood\n" * 20)
    return TextClassificationDataModule(path=str(p / "reviews.tsv"), num_classes=2).vocab


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        pytest.param(
            missing_file, FileNotFoundError, "`path` to be an existing file", id="missing"
        ),
        pytest.param(empty_file, ValueError, "`path` to be a non-empty file", id="empty"),
        pytest.param(
            missing_column, ValueError, r"`text_column`='review'.*got columns", id="column"
        ),
        pytest.param(label_out_of_range, ValueError, r"labels in \[0, 1\].*got 3", id="labels"),
    ],
)
def test_bad_data(make, error, match, tmp_path, tsv_file):
    os.replace(tsv_file, tmp_path / "reviews.tsv")
    with pytest.raises(error, match=match):
        make(tmp_path)


@pytest.mark.parametrize(
    ("arg", "match"),
    [
        pytest.param("--model.norm=weight", "norm", id="norm"),
        pytest.param("--model.cell=rnn", "cell", id="cell"),
        pytest.param("--model.hiden_size=3", "hiden_size", id="unknown-key"),
    ],
)
def test_bad_config_fails_before_training(arg, match, text_file, tmp_path, capsys):
    with pytest.raises((SystemExit, ValueError)) as info:
        train_lm.main(lm_args(text_file, tmp_path, "--trainer.max_steps=1", arg))
    message = str(info.value) + capsys.readouterr().err
    assert match in message
    assert not glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)


@pytest.mark.parametrize("model", [LanguageModel, SequenceClassifier])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"lr": 0}, r"`lr` to be a positive number, got 0", id="lr-0"),
        pytest.param({"lr": -1e-3}, r"`lr` to be a positive number, got -0\.001", id="lr-negative"),
        pytest.param(
            {"optimizer": "sgd", "momentum": 1.0},
            r"`momentum` to be a number in \[0, 1\), got 1\.0",
            id="momentum-1",
        ),
        pytest.param(
            {"momentum": 0.9},
            r"momentum=0 with optimizer='adam' \(momentum is plain SGD's\), got momentum=0\.9",
            id="momentum-adam",
        ),
        pytest.param(
            {"dropout": 1.5}, r"dropout should be a number in range \[0, 1\]", id="dropout"
        ),
    ],
)
def test_bad_training_arguments_fail_when_the_model_is_built(model, kwargs, match):
    """Not when training starts (torch.optim's checks), or never (momentum 1 with SGD; momentum
    with Adam, which has none; dropout 1.5 with one layer, which was dropped unchecked)."""
    with pytest.raises(ValueError, match=match):
        model(list("abcdefgh"), **kwargs)


def test_dropout_with_one_layer_warns_as_in_torch():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        LanguageModel(list("abcdefgh"), dropout=0.3)


def test_the_checkpoint_file_holds_the_vocabulary(text_file, tmp_path):
    dm = CharLMDataModule(path=text_file, batch_size=2, bptt=10)
    model = LanguageModel(dm.vocab, hidden_size=8, embedding_dim=4)
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    saved = torch.load(tmp_path / "model.ckpt", weights_only=True)  # safely loadable, too
    assert saved["hyper_parameters"]["vocab"] == ["<pad>", "<unk>", *dm.vocab[2:]]
    assert set(dm.vocab[2:]) == set(TEXT)  # every character of the training text, once


def tsv(tmp_path, rows, header="label\ttext\n", name="reviews.tsv"):
    path = tmp_path / name
    path.write_text(header + "".join(f"{label}\t{text}\n" for label, text in rows))
    return str(path)


@pytest.mark.slow
def test_string_labels_become_named_classes_saved_and_predicted(tmp_path):
    """Labels "neg"/"pos" are classes 0/1 (sorted); the names travel with the checkpoint and
    predictions are names."""
    rows = [
        ("pos" if i % 2 else "neg", f"{'a good fine' if i % 2 else 'a bad dull'} film {i}")
        for i in range(60)
    ]
    path = tsv(tmp_path, rows)
    args = [
        "fit",
        "--config",
        os.path.join(ROOT, "configs", "cls_mr_polarity_ln_lstm.yaml"),
        f"--data.path={path}",
        "--trainer.max_epochs=1",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        f"--trainer.default_root_dir={tmp_path}",
        "--model.hidden_size=8",
        "--data.batch_size=8",
        *QUIET,
    ]
    cli = train_classifier.main(args)
    assert cli.datamodule.label_names == ["neg", "pos"] and cli.model.label_names == ["neg", "pos"]
    cli.trainer.save_checkpoint(tmp_path / "cls.ckpt")
    loaded = SequenceClassifier.load_from_checkpoint(tmp_path / "cls.ckpt")
    assert loaded.label_names == ["neg", "pos"]
    predictions = cli.trainer.predict(loaded, cli.datamodule.test_dataloader())
    assert {p for batch in predictions for p in batch} <= {"neg", "pos"}
    assert sum(len(batch) for batch in predictions) == len(cli.datamodule.test_dataloader().dataset)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        pytest.param(
            {"train": [0, 1.7], "val": [0], "test": [1]},
            r"whole-number labels.*got 1.7 in the train split",
            id="fraction",
        ),
        pytest.param(
            {"train": ["neg", "pos"], "val": ["neutral"], "test": ["pos"]},
            r"one of the training split's labels \['neg', 'pos'\].*got 'neutral' in the val split",
            id="unseen-name",
        ),
        pytest.param(
            {"train": [0, 1], "val": [5], "test": [1]},
            r"labels in \[0, 1\].*got 5 in the val split",
            id="range",
        ),
        pytest.param(
            {"train": ["neg", 1], "val": [0], "test": [1]},
            r"whole-number labels \(or strings in every row\).*got 'neg'",
            id="mixed",
        ),
    ],
)
def test_bad_labels_are_named(labels, match):
    from seqnorm.lightning.data import label_classes

    with pytest.raises(ValueError, match=match):
        label_classes(labels, None, None, "label", "reviews.tsv")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"batch_size": 0}, "batch_size must be greater than zero, got 0", id="batch"),
        pytest.param({"val_fraction": 0}, r"val_fraction=0 and test_fraction=0\.1", id="val-0"),
        pytest.param(
            {"test_fraction": 0.95}, r"val_fraction=0\.1 and test_fraction=0\.95", id="sum"
        ),
        pytest.param({"max_length": 0}, "max_length must be greater than zero, got 0", id="length"),
    ],
)
def test_bad_classifier_data_arguments_are_named(kwargs, match, tsv_file):
    """When the data module is built (a zero val_fraction failed inside datasets' split with a
    message about test_size; max_length 0 cut every sentence to nothing)."""
    with pytest.raises(ValueError, match=match):
        TextClassificationDataModule(path=tsv_file, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"bptt": 0}, "bptt must be greater than zero, got 0", id="bptt"),
        pytest.param({"val_fraction": 1.2}, r"val_fraction=1\.2 and test_fraction=0\.05", id="val"),
    ],
)
def test_bad_lm_data_arguments_are_named(kwargs, match, text_file):
    with pytest.raises(ValueError, match=match):
        CharLMDataModule(path=text_file, **kwargs)


def test_class_label_names_and_whole_numbers():
    from seqnorm.lightning.data import label_classes

    names, ids = label_classes(
        {"train": [1, 0], "val": [2]}, ["bad", "ok", "good"], None, "label", "hub"
    )
    assert names == ["bad", "ok", "good"] and ids == {"train": [1, 0], "val": [2]}
    names, ids = label_classes({"train": [1.0, 0.0, 2.0]}, None, None, "label", "f.csv")
    assert names == ["0", "1", "2"] and ids == {"train": [1, 0, 2]}


def test_csv_without_header_names_its_columns_by_position(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text(
        "".join(f"{i % 2},a {'good' if i % 2 else 'bad'} film {i}\n" for i in range(40))
    )
    with pytest.raises(
        ValueError,
        match=r"no header row, name its columns in order with the data module's `column_names`",
    ):
        _ = TextClassificationDataModule(path=str(path)).vocab
    dm = TextClassificationDataModule(path=str(path), column_names=["label", "text"])
    assert dm.num_classes == 2 and "film" in dm.vocab


def test_a_file_that_is_not_utf8_is_named_with_its_offset(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(("plain ascii text " * 10).encode() + "café".encode("latin-1") + b"\n" * 50)
    with pytest.raises(
        ValueError,
        match=rf"{path.name}' is not valid utf-8 text: the bytes at offset 173 .*`encoding` argument",
    ):
        _ = CharLMDataModule(path=str(path)).vocab
    assert "é" in CharLMDataModule(path=str(path), encoding="latin-1").vocab
    with pytest.raises(ValueError, match=r"`encoding` to name a text encoding, got 'utf-99'"):
        _ = CharLMDataModule(path=str(path), encoding="utf-99").vocab


def test_a_split_too_small_for_one_batch_is_named(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("x" * 2000)
    dm = CharLMDataModule(path=str(path), batch_size=64, bptt=10)
    with pytest.raises(
        ValueError,
        match=r"The val split of .*small.txt holds \d+ characters, too few for one batch of batch_size=64",
    ):
        dm.setup("fit")


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory):
    """A checkpoint of two training steps, made once for the tests that read it (read-only)."""
    root = tmp_path_factory.mktemp("lm_checkpoint")
    text = root / "corpus.txt"
    text.write_text(TEXT)
    cli = train_lm.main(
        lm_args(str(text), root, "--trainer.max_steps=2", "--trainer.limit_val_batches=0")
    )
    path = root / "model.ckpt"
    cli.trainer.save_checkpoint(path)
    return path


def test_generate_checks_its_arguments_before_reading_the_checkpoint(tmp_path, capsys):
    for args, match in [
        (["--temperature", "0"], "`temperature` to be a positive number, got 0.0"),
        (["--length", "-1"], "`length` to be a whole number >= 0, got -1"),
    ]:
        with pytest.raises(SystemExit):
            generate.main([str(tmp_path / "missing.ckpt"), *args])
        assert match in capsys.readouterr().err


def test_generate_refuses_a_prompt_outside_the_vocabulary_and_never_samples_unk(lm_checkpoint):
    with pytest.raises(ValueError, match=r"got \['Q', 'Z'\], which the model never saw"):
        generate.main([str(lm_checkpoint), "--prompt", "the QZ"])
    model = LanguageModel.load_from_checkpoint(lm_checkpoint)
    with torch.no_grad():
        model.decoder.bias[1] += 25  # <unk> would be all but certain
    assert "<unk>" not in model.generate("the ", 50, seed=0)


@pytest.mark.parametrize("kind", ["truncated", "foreign", "pickled-object"])
def test_a_bad_checkpoint_gets_a_clear_error(kind, lm_checkpoint, tmp_path, text_file, capsys):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(lm_checkpoint.read_bytes()[:5000])
        match = "not a checkpoint seqnorm can read safely.*truncated or corrupted"
    elif kind == "foreign":
        torch.save({"model": torch.zeros(3)}, path)
        match = "not a checkpoint of a LanguageModel"
    else:
        torch.save(torch.nn.Linear(2, 2), path)  # loadable only by running pickled code
        match = "not a checkpoint seqnorm can read safely"
    with pytest.raises(SystemExit):
        generate.main([str(path)])
    assert re.search(match, capsys.readouterr().err)
    with pytest.raises(ValueError, match=match):  # resuming from it fails before training
        train_lm.main(lm_args(text_file, tmp_path, "--trainer.max_steps=1", f"--ckpt_path={path}"))


@pytest.mark.slow
def test_a_checkpoint_meets_data_with_another_vocabulary(text_file, tmp_path):
    """Testing a checkpoint on data whose vocabulary (or class names) differs is an error naming
    the first difference, before any weights load: with a vocabulary of the same size the
    weights would have read every token as another one, silently (here another seed of the
    split under max_vocab gives one); the same data loads."""
    words = [f"w{k}" for k in range(12)]
    rows = [
        (i % 2, " ".join(words[(i * 7 + j * j) % 12] for j in range(i % 5 + 1))) for i in range(200)
    ]
    tsv_file = tsv(tmp_path, rows)
    args = lambda *more: [
        "--config",
        os.path.join(ROOT, "configs", "cls_mr_polarity_ln_lstm.yaml"),
        f"--data.path={tsv_file}",
        "--data.max_vocab=8",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        f"--trainer.default_root_dir={tmp_path}",
        "--model.hidden_size=8",
        *QUIET,
        *more,
    ]
    cli = train_classifier.main(
        ["fit", *args("--trainer.max_steps=1", "--trainer.limit_val_batches=0")]
    )
    cli.trainer.save_checkpoint(tmp_path / "model.ckpt")
    ckpt = f"--ckpt_path={tmp_path / 'model.ckpt'}"
    other = TextClassificationDataModule(path=tsv_file, max_vocab=8, seed=5)
    assert len(other.vocab) == len(cli.model.vocab) and other.vocab != cli.model.vocab
    with pytest.raises(ValueError, match=r"another `vocab`.*8 entries there, 8 here; entry \d+ is"):
        train_classifier.main(["test", *args("--data.seed=5"), ckpt])
    train_classifier.main(["test", *args(), ckpt])  # the data it was trained on
    relabelled = tsv(
        tmp_path, [("pos" if i % 2 else "neg", f"a film number {i}") for i in range(200)]
    )
    with pytest.raises(ValueError, match=r"another `vocab`|another `label_names`"):
        train_classifier.main(["test", *args(f"--data.path={relabelled}"), ckpt])
    lm = LanguageModel(CharLMDataModule(path=text_file).vocab, hidden_size=8, embedding_dim=4)
    lm_ckpt = {"hyper_parameters": {"level": "char", "vocab": [*lm.vocab[:-1], "@"]}}
    with pytest.raises(ValueError, match=r"another `vocab`.*'@' there"):
        lm.on_load_checkpoint(lm_ckpt)
