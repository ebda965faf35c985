"""Callbacks for the recipes: a sample after training, a smoothed learning curve, evaluation of
batch norm with batch statistics, and the classifier's predictions written to a file."""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from seqnorm.norms import RecurrentBatchNorm

from .models import LanguageModel


class PrintSample(L.Callback):
    """At the end of fit: print the validation metrics and a sample from the trained model."""

    def __init__(
        self, prompt: str = "", length: int = 300, temperature: float = 0.8, seed: int = 0
    ):
        self.prompt, self.length, self.temperature, self.seed = prompt, length, temperature, seed

    def on_fit_end(self, trainer: L.Trainer, pl_module: LanguageModel) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {
            k: f"{float(v):.4f}"
            for k, v in trainer.callback_metrics.items()
            if k.startswith("val_")
        }
        if metrics:  # none when fit resumed a run that had already finished
            print(f"\nvalidation after {trainer.global_step} steps: {metrics}")
        text = pl_module.generate(self.prompt, self.length, self.temperature, seed=self.seed)
        print(f"sample (temperature {self.temperature}):\n{text}\n")


class TrainingCurve(L.Callback):
    """The training loss averaged over every ``every`` samples seen, written to the trainer's
    loggers as ``curve_loss`` with ``curve_samples`` (the samples seen so far): a learning curve
    that is comparable across batch sizes, and smooth even at batch size 1, where the loss of a
    single step is noise.

    Args:
        every: samples per point (> 0).
    """

    def __init__(self, every: int):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Expected argument `every` to be a whole number >= 1, got {every!r}")
        self.every = every
        self._total, self._samples, self._seen = 0.0, 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        n = len(batch[0] if isinstance(batch, (tuple, list)) else batch)
        self._total += float(loss) * n
        self._samples += n
        self._seen += n
        if self._samples >= self.every:
            metrics = {"curve_loss": self._total / self._samples, "curve_samples": self._seen}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            self._total, self._samples = 0.0, 0

    def state_dict(self) -> dict:
        return {"total": self._total, "samples": self._samples, "seen": self._seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self._total, self._samples = state_dict["total"], state_dict["samples"]
        self._seen = state_dict["seen"]


class BatchStatistics(L.Callback):
    """Validate and test with every recurrent batch norm in training mode (statistics of each
    batch, as the training loss saw them) while its running statistics stay as they are: with
    and without this callback, the difference is batch norm's train/eval gap."""

    def _start(self, pl_module) -> None:
        self._saved = []
        for m in pl_module.modules():
            if isinstance(m, RecurrentBatchNorm):
                self._saved.append((m, [b.detach().clone() for b in m.buffers()]))
                m.train()

    def _end(self, pl_module) -> None:
        with torch.no_grad():
            for m, buffers in self._saved:
                for b, saved in zip(m.buffers(), buffers):
                    b.copy_(saved)
                m.eval()
        self._saved = []

    def on_validation_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._end(pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._end(pl_module)


class WritePredictions(BasePredictionWriter):
    """After ``predict``: each document of the data module's ``predict_path``, as its predict
    loader read it, with its predicted class, ``label<TAB>document`` per line in the input's
    order, written to ``path`` (the classifier's ``predict`` subcommand adds one writing
    ``predictions.tsv`` in the trainer's ``default_root_dir`` unless the trainer has a
    prediction writer)."""

    def __init__(self, path: str = "predictions.tsv"):
        super().__init__(write_interval="epoch")
        self.path = path

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        labels = [label for batch in predictions for label in batch]
        documents = getattr(trainer.datamodule, "predicted_documents", None)
        if documents is None:
            raise RuntimeError(
                "WritePredictions writes the documents a TextClassificationDataModule's predict "
                "loader read: predict with that data module (trainer.predict(model, "
                "datamodule=...)), not with a dataloader of your own"
            )
        if len(labels) != len(documents):  # a sampler that split or padded them
            raise RuntimeError(
                f"Expected a prediction for each of the {len(documents)} documents, got "
                f"{len(labels)}; predict on one device (--trainer.devices=1)"
            )
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(f"{label}\t{doc}\n" for label, doc in zip(labels, documents))
