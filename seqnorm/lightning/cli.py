"""The recipes' command lines: LightningCLI for the language model and the classifier.

``recipes/train_lm.py`` and ``recipes/train_classifier.py`` run them; the batch-size study
(``recipes/batch_size_study.py``) extends them with its sweep, so every recipe reads the same
YAML configs.
"""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI

from .callbacks import WritePredictions
from .data import LMDataModule, TextClassificationDataModule
from .models import LanguageModel, SequenceClassifier, check_checkpoint


class _CheckedCLI(LightningCLI):
    """A LightningCLI that refuses a bad ``--ckpt_path`` before anything is built or trained, and
    offers the subcommands the recipes' DataModules serve."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's, less ``predict``, which the language model's data has no split for
        (sample text from it with ``recipes/generate.py``); the classifier's CLI offers it."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def parse_arguments(self, parser, args):
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint(self.config[subcommand].get("ckpt_path"), self.model_class)


class LMCLI(_CheckedCLI):
    """A :class:`LanguageModel` on any :class:`LMDataModule` (``data.class_path`` picks one); the
    vocabulary and level are linked from the data."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        super().__init__(
            LanguageModel,
            LMDataModule,
            subclass_mode_data=True,
            # Batches are consecutive windows of fixed streams; the DataModule shards them by rank.
            trainer_defaults={"use_distributed_sampler": False},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")
        parser.link_arguments("data.level", "model.level", apply_on="instantiate")


class ClassifierCLI(_CheckedCLI):
    """A :class:`SequenceClassifier` on a :class:`TextClassificationDataModule`; the vocabulary,
    the number of classes and their names are linked from the data. ``predict`` classifies the
    documents of ``--data.predict_path`` (one per line) and writes them with their labels to
    ``predictions.tsv`` in the trainer's ``default_root_dir`` (:class:`WritePredictions`)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return LightningCLI.subcommands()

    def before_predict(self) -> None:
        trainer = self.trainer
        if trainer.world_size > 1:
            raise ValueError(
                "predict writes one file from one process: run it on one device "
                f"(--trainer.devices=1), got {trainer.world_size} processes"
            )
        self.datamodule.predict_documents()  # a missing file is named before the model loads
        if not any(isinstance(c, BasePredictionWriter) for c in trainer.callbacks):
            path = os.path.join(trainer.default_root_dir, "predictions.tsv")
            trainer.callbacks.append(WritePredictions(path))

    def after_predict(self) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, WritePredictions):
                print(f"predictions: {callback.path}")

    def __init__(self, args=None, run: bool = True, **kwargs):
        super().__init__(
            SequenceClassifier,
            TextClassificationDataModule,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.label_names", "model.label_names", apply_on="instantiate")
