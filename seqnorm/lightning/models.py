"""LightningModules: a language model with truncated BPTT and a sequence classifier."""

from __future__ import annotations

import math
import os

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

import seqnorm
from seqnorm.norms import RecurrentBatchNorm

CELLS = ("lstm", "gru")
IMPLEMENTATIONS = ("seqnorm", "torch")


def build_rnn(
    cell: str,
    implementation: str,
    input_size: int,
    hidden_size: int,
    num_layers: int,
    dropout: float,
    norm: str,
    groups: int,
    bidirectional: bool = False,
) -> nn.Module:
    """A seqnorm RNN, or ``torch.nn.LSTM``/``GRU`` (no normalization) for comparison."""
    if cell not in CELLS:
        raise ValueError(f"Expected argument `cell` to be one of {CELLS}, got {cell!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Expected argument `implementation` to be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    kw = {
        "num_layers": num_layers,
        "dropout": dropout,  # between stacked layers: the RNN warns about it with one layer
        "bidirectional": bidirectional,
        "batch_first": True,
    }
    if implementation == "torch":
        if norm != "none":
            raise ValueError(f"Expected norm='none' with implementation='torch', got norm={norm!r}")
        return getattr(nn, cell.upper())(input_size, hidden_size, **kw)
    return getattr(seqnorm, cell.upper())(input_size, hidden_size, norm=norm, groups=groups, **kw)


def sync_batch_norm(module: nn.Module, sync: bool = True) -> None:
    """Let every recurrent batch norm in ``module`` take its statistics over all processes."""
    for m in module.modules():
        if isinstance(m, RecurrentBatchNorm):
            m.sync = sync


def check_optimizer(optimizer: str, lr: float, momentum: float) -> None:
    """The optimizer's arguments, checked when the model is built rather than when training
    starts (torch.optim takes a negative rate as an error, and a momentum of 1 or more, which
    never forgets a gradient, without one)."""
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"Expected argument `optimizer` to be 'adam' or 'sgd', got {optimizer!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"Expected argument `lr` to be a positive number, got {lr!r}")
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not 0 <= momentum < 1
    ):
        raise ValueError(f"Expected argument `momentum` to be a number in [0, 1), got {momentum!r}")
    if momentum and optimizer != "sgd":
        raise ValueError(
            f"Expected momentum=0 with optimizer={optimizer!r} (momentum is plain SGD's), got "
            f"momentum={momentum!r}"
        )


def make_optimizer(parameters, hparams) -> torch.optim.Optimizer:
    """Adam, or plain SGD (``momentum`` 0 is pure SGD), from the model's hyperparameters."""
    if hparams.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=hparams.lr, momentum=hparams.momentum)
    return torch.optim.Adam(parameters, lr=hparams.lr)


def check_generation(length, temperature) -> None:
    """Sampling's arguments, checked before anything is loaded."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"Expected argument `length` to be a whole number >= 0, got {length!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not temperature > 0
    ):
        raise ValueError(
            f"Expected argument `temperature` to be a positive number, got {temperature!r}"
        )


def check_checkpoint(path, model_class: type[L.LightningModule]) -> None:
    """Raise a clear error if ``path`` is not a readable checkpoint of ``model_class``: a
    truncated or corrupted file, or another program's (instead of torch's advice to load it
    with ``weights_only=False``, which would run whatever code the file holds)."""
    if (
        path is None
        or path in ("last", "best", "hpc", "registry")
        or str(path).startswith("registry:")
    ):
        return  # resolved by Lightning
    name, recipe = model_class.__name__, "recipes/train_lm.py or recipes/train_classifier.py"
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Expected a checkpoint file of a {name}, got {str(path)!r}, which does not exist"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{str(path)!r} is not a checkpoint seqnorm can read safely ({type(error).__name__}: "
            f"{first}). It may be truncated or corrupted (a run killed while saving), or written "
            f"by another program; checkpoints come from {recipe}"
        ) from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint or "vocab" not in hparams:
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{str(path)!r} is not a checkpoint of a {name} (it holds {keys}); checkpoints come "
            f"from {recipe}"
        )
    expected = "level" if model_class is LanguageModel else "num_classes"
    if expected not in hparams:
        raise ValueError(f"{str(path)!r} is a checkpoint of another kind of model, not of a {name}")


def check_same_data(checkpoint: dict, model: L.LightningModule, fields: tuple[str, ...]) -> None:
    """Raise a clear error if a checkpoint being loaded into ``model`` was trained with another
    vocabulary (or other class names, or another level): its weights would read every token as
    another one, silently where the sizes agree (a data module builds its vocabulary from its
    training split, so another file, seed, split or size limit changes it)."""
    saved = checkpoint.get("hyper_parameters") or {}
    for field in fields:
        theirs = saved.get(field)
        ours = getattr(model, field) if hasattr(model, field) else model.hparams.get(field)
        if theirs is None or theirs == ours:
            continue
        if isinstance(ours, list) and isinstance(theirs, list):
            first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), None)
            where = (
                f"entry {first} is {theirs[first]!r} there and {ours[first]!r} here"
                if first is not None
                else "one is a prefix of the other"
            )
            detail = f"{len(theirs)} entries there, {len(ours)} here; {where}"
        else:
            detail = f"{theirs!r} there, {ours!r} here"
        raise ValueError(
            f"The checkpoint was trained with another `{field}` than the data gives this model "
            f"({detail}). The data module builds it from its training split: load the "
            f"checkpoint with the data it was trained on (the same file or data set, seed, "
            f"fractions, min_freq and max_vocab; the run's saved config.yaml has them)"
        )


def _detach(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


class LanguageModel(L.LightningModule):
    """Embedding, a (normalized) RNN and a decoder, trained with truncated BPTT.

    Consecutive batches continue each other (see ``StreamBatches``), so the hidden state is
    carried across them, detached, and reset at each epoch start. It is saved in checkpoints, so
    a run resumed mid-epoch goes on exactly where it stopped (with another batch size or
    window it warns: the data module's ``load_state_dict``). Logs loss and bits per character
    (``level="char"``) or perplexity (``level="word"``).

    Args:
        vocab: the tokens (linked from the DataModule; saved with the checkpoint).
        level: ``"char"`` or ``"word"``.
        cell: ``"lstm"`` or ``"gru"``; implementation: ``"seqnorm"`` or ``"torch"`` (baseline).
        norm, groups: as in :class:`seqnorm.LSTM`; dropout: between stacked layers, as there.
        optimizer: ``"adam"`` or ``"sgd"`` (plain SGD, with ``momentum``, 0 by default: pure
            SGD at batch size 1); lr: its learning rate.
    """

    def __init__(
        self,
        vocab: list[str],
        level: str = "char",
        cell: str = "lstm",
        norm: str = "layer",
        groups: int = 1,
        implementation: str = "seqnorm",
        embedding_dim: int = 64,
        hidden_size: int = 256,
        num_layers: int = 1,
        dropout: float = 0.0,
        lr: float = 2e-3,
        momentum: float = 0.0,
        optimizer: str = "adam",
    ):
        super().__init__()
        if level not in ("char", "word"):
            raise ValueError(f"Expected argument `level` to be 'char' or 'word', got {level!r}")
        check_optimizer(optimizer, lr, momentum)
        self.save_hyperparameters()
        self.vocab = list(vocab)
        self.embedding = nn.Embedding(len(vocab), embedding_dim)
        self.rnn = build_rnn(
            cell, implementation, embedding_dim, hidden_size, num_layers, dropout, norm, groups
        )
        self.decoder = nn.Linear(hidden_size, len(vocab))
        self.metrics = nn.ModuleDict(
            {f"{s}_loss": torchmetrics.MeanMetric() for s in ("train", "val", "test")}
        )
        self._state: dict[str, object] = {}

    def forward(self, tokens: torch.Tensor, state=None):
        """``tokens`` ``(N, L)`` -> logits ``(N, L, V)`` and the RNN state."""
        output, state = self.rnn(self.embedding(tokens), state)
        return self.decoder(output), state

    def _step(self, batch: torch.Tensor, split: str) -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]
        state = self._state.get(split)
        n = x.shape[0]
        if state is not None and (state[0] if isinstance(state, tuple) else state).shape[1] != n:
            state = None
        logits, state = self(x, state)
        self._state[split] = _detach(state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        metric = self.metrics[f"{split}_loss"]
        metric(loss.detach(), weight=y.numel())
        self.log(
            f"{split}_loss",
            metric,
            prog_bar=split != "test",
            on_step=split == "train",
            on_epoch=True,
        )
        return loss

    def on_train_epoch_start(self) -> None:
        self._state.pop("train", None)

    def on_validation_epoch_start(self) -> None:
        self._state.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self._state.pop("test", None)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_derived("val")

    def on_test_epoch_end(self) -> None:
        self._log_derived("test")

    def _log_derived(self, split: str) -> None:
        loss = self.metrics[f"{split}_loss"].compute()
        if self.hparams.level == "char":
            self.log(f"{split}_bpc", loss / math.log(2), prog_bar=True)
        else:
            self.log(f"{split}_ppl", torch.exp(loss), prog_bar=True)

    def on_fit_start(self) -> None:
        sync_batch_norm(self, self.trainer.world_size > 1)

    def configure_optimizers(self):
        return make_optimizer(self.parameters(), self.hparams)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rnn_state"] = self._state.get("train")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_same_data(checkpoint, self, ("level", "vocab"))
        if checkpoint.get("rnn_state") is not None:
            self._state["train"] = checkpoint["rnn_state"]

    @torch.no_grad()
    def generate(
        self, prompt: str = "", length: int = 200, temperature: float = 1.0, seed: int | None = None
    ) -> str:
        """Sample ``length`` tokens after ``prompt`` (``temperature`` > 0; lower is more certain)."""
        check_generation(length, temperature)
        index = {t: i for i, t in enumerate(self.vocab)}
        sep = "" if self.hparams.level == "char" else " "
        tokens = list(prompt) if sep == "" else prompt.split()
        unknown = sorted({t for t in tokens if t not in index})
        if unknown:
            raise ValueError(
                f"Expected a prompt of tokens in the model's vocabulary, got {unknown!r}, which "
                "the model never saw in training"
            )
        was_training = self.training
        self.eval()
        ids = [index[t] for t in tokens] or [index.get("\n", index.get("<eos>", 1))]
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        logits, state = self(torch.tensor([ids], device=self.device))
        out = []
        for _ in range(length):
            probs = torch.softmax(logits[0, -1].float().cpu() / temperature, dim=-1)
            probs[:2] = 0  # never <pad> or <unk> (Vocabulary's indices 0 and 1)
            nxt = int(torch.multinomial(probs, 1, generator=generator))
            out.append(self.vocab[nxt])
            logits, state = self(torch.tensor([[nxt]], device=self.device), state)
        self.train(was_training)
        return prompt + sep + sep.join(out) if prompt and sep else prompt + sep.join(out)


class SequenceClassifier(L.LightningModule):
    """Embedding, a (normalized, optionally bidirectional) RNN over padded batches, mean pooling
    over each sample's valid steps only, and a linear classifier. Logs loss, accuracy and F1.

    Args:
        vocab: the tokens (linked from the DataModule).
        num_classes: linked from the DataModule.
        label_names: each class's name (linked from the DataModule; saved with the checkpoint,
            and what ``predict_step`` returns).
        bidirectional: as in :class:`seqnorm.LSTM`; the other arguments as in
            :class:`LanguageModel`.
    """

    def __init__(
        self,
        vocab: list[str],
        num_classes: int = 2,
        label_names: list[str] | None = None,
        cell: str = "lstm",
        norm: str = "layer",
        groups: int = 1,
        implementation: str = "seqnorm",
        embedding_dim: int = 100,
        hidden_size: int = 128,
        num_layers: int = 1,
        bidirectional: bool = True,
        dropout: float = 0.0,
        lr: float = 2e-3,
        momentum: float = 0.0,
        optimizer: str = "adam",
    ):
        super().__init__()
        check_optimizer(optimizer, lr, momentum)
        if label_names is not None and len(label_names) != num_classes:
            raise ValueError(
                f"Expected {num_classes} label names (num_classes={num_classes}), got {label_names!r}"
            )
        self.save_hyperparameters()
        self.vocab = list(vocab)
        self.label_names = (
            list(label_names) if label_names else [str(i) for i in range(num_classes)]
        )
        self.embedding = nn.Embedding(len(vocab), embedding_dim, padding_idx=0)
        self.rnn = build_rnn(
            cell,
            implementation,
            embedding_dim,
            hidden_size,
            num_layers,
            dropout,
            norm,
            groups,
            bidirectional,
        )
        self.classifier = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)
        task = {"task": "multiclass", "num_classes": num_classes}
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{name}": metric
                for split in ("train", "val", "test")
                for name, metric in (
                    ("acc", torchmetrics.Accuracy(**task)),
                    ("f1", torchmetrics.F1Score(**task, average="macro")),
                )
            }
        )

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(N, L)``, ``lengths`` ``(N,)`` -> logits ``(N, classes)``."""
        x = self.embedding(tokens)
        if self.hparams.implementation == "torch":
            packed = nn.utils.rnn.pack_padded_sequence(
                x, lengths.cpu(), batch_first=True, enforce_sorted=False
            )
            output, _ = self.rnn(packed)
            output, _ = nn.utils.rnn.pad_packed_sequence(
                output, batch_first=True, total_length=x.shape[1]
            )
        else:
            output, _ = self.rnn(x, lengths=lengths)
        pooled = output.sum(1) / lengths.to(output.dtype).unsqueeze(1)  # padding outputs are zero
        return self.classifier(pooled)

    def _step(self, batch, split: str) -> torch.Tensor:
        tokens, lengths, labels = batch
        logits = self(tokens, lengths)
        loss = F.cross_entropy(logits, labels)
        self.log(
            f"{split}_loss",
            loss,
            prog_bar=True,
            on_step=split == "train",
            on_epoch=True,
            batch_size=len(labels),
        )
        for name in ("acc", "f1"):
            metric = self.metrics[f"{split}_{name}"]
            metric(logits, labels)
            self.log(
                f"{split}_{name}", metric, prog_bar=name == "acc", on_epoch=True, on_step=False
            )
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx) -> list[str]:
        """The predicted class of each sample, by name."""
        tokens, lengths, _ = batch
        return [self.label_names[i] for i in self(tokens, lengths).argmax(-1).tolist()]

    def on_fit_start(self) -> None:
        sync_batch_norm(self, self.trainer.world_size > 1)

    def configure_optimizers(self):
        return make_optimizer(self.parameters(), self.hparams)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_same_data(checkpoint, self, ("vocab", "label_names"))
