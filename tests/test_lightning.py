"""The Lightning recipes: configs, training, resume, DDP, generation and bad input."""

import glob
import os
import subprocess
import sys

import datasets
import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("lightning")

import lightning as L

from seqnorm.lightning import CharLMDataModule, LanguageModel, TextClassificationDataModule
from seqnorm.lightning import data as data_module
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
    c for c in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
    if not os.path.basename(c).startswith("study_")  # the batch-size study's: tests/test_study.py
)  # fmt: skip


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


def lm_args(text_file, tmp_path, *extra):
    return [
        "fit", "--config", os.path.join(ROOT, "configs", "char_lm_pydoc_ln_lstm.yaml"),
        f"--data.init_args.path={text_file}", "--data.init_args.batch_size=4", "--data.init_args.bptt=20",
        "--model.hidden_size=32", "--model.embedding_dim=8", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false", "--trainer.callbacks=[]", *QUIET, *extra,
    ]  # fmt: skip


def test_lm_recipe_fast_dev_run(text_file, tmp_path):
    train_lm.main(lm_args(text_file, tmp_path, "--trainer.fast_dev_run=true"))


def test_local_lm_config_trains_on_a_small_file(text_file, tmp_path, monkeypatch):
    """The README's own-text command, config as shipped: a file of a few dozen batches validates and
    checkpoints within its epoch (a step-count interval longer than the epoch used to fail)."""
    monkeypatch.chdir(tmp_path)  # the config writes to runs/ under the working directory
    args = [
        "fit", "--config", os.path.join(ROOT, "configs", "char_lm_local_ln_lstm.yaml"),
        f"--data.init_args.path={text_file}", "--data.init_args.batch_size=8", "--data.init_args.bptt=40",
        "--model.hidden_size=16", *QUIET,
    ]  # fmt: skip
    cli = train_lm.main(args)
    assert cli.trainer.num_training_batches < 500
    assert "val_bpc" in cli.trainer.callback_metrics
    saved = os.listdir(tmp_path / "runs" / "char_lm_local_ln_lstm" / "checkpoints")
    assert "last.ckpt" in saved and len(saved) == 2, saved  # the last and the best


def test_classifier_recipe_fast_dev_run(tsv_file, tmp_path):
    args = [
        "fit", "--config", os.path.join(ROOT, "configs", "cls_mr_polarity_ln_lstm.yaml"), f"--data.path={tsv_file}",
        "--trainer.fast_dev_run=true", "--trainer.logger=false", "--trainer.callbacks=[]",
        f"--trainer.default_root_dir={tmp_path}", "--model.hidden_size=16", *QUIET,
    ]  # fmt: skip
    train_classifier.main(args)


def test_char_lm_overfits_a_tiny_corpus(text_file, tmp_path):
    cli = train_lm.main(lm_args(text_file, tmp_path, "--trainer.max_steps=150", "--trainer.limit_val_batches=0",
                                "--model.lr=0.01"))  # fmt: skip
    loss = float(cli.trainer.callback_metrics["train_loss_step"])
    # A uniform guess over the 29 characters costs ln(29) = 3.37 nats; the repeated sentence is learnable.
    assert loss < 0.5, loss


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_resume_mid_epoch_continues_the_same_run(text_file, tmp_path, norm):
    """Killed at step 7 of 12 and resumed from its checkpoint = never interrupted."""

    def fit(root, max_steps, ckpt_path=None):
        ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(root), "every_n_train_steps": 7, "save_top_k": -1}}  # fmt: skip
        args = lm_args(text_file, root, f"--trainer.max_steps={max_steps}", "--trainer.limit_val_batches=0",
                       f"--model.norm={norm}", f"--trainer.callbacks=[{ckpt}]")  # fmt: skip
        args[args.index("--trainer.callbacks=[]")] = "--trainer.max_epochs=1"
        if ckpt_path:
            args.append(f"--ckpt_path={ckpt_path}")
        return train_lm.main(args).model

    straight = fit(tmp_path / "straight", 12)
    fit(tmp_path / "broken", 7)
    (checkpoint,) = glob.glob(str(tmp_path / "broken" / "*step=7.ckpt"))
    resumed = fit(tmp_path / "resumed", 12, checkpoint)
    got, want = resumed.state_dict(), straight.state_dict()
    assert got.keys() == want.keys() and got["rnn._extra_state"] == want["rnn._extra_state"]
    tensors = lambda state: {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert_close(tensors(got), tensors(want), rtol=0, atol=0)


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
    args = lm_args(text_file, tmp_path, "--trainer.max_steps=3", "--trainer.limit_val_batches=2",
                   "--model.norm=batch", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.val_check_interval=2",
                   "--trainer.accelerator=cpu")  # fmt: skip
    result = subprocess.run([sys.executable, os.path.join(ROOT, "recipes", "train_lm.py"), *args],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


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


def test_datamodule_vocab_travels_with_the_model(text_file):
    dm = CharLMDataModule(path=text_file, batch_size=2, bptt=10)
    model = LanguageModel(dm.vocab, hidden_size=8, embedding_dim=4)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)  # fmt: skip
    trainer.fit(model, dm)
    assert model.hparams.vocab == dm.vocab
