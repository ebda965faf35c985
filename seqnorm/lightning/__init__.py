"""The Lightning training layer: LightningModules and DataModules (needs the ``train`` extra)."""

from .callbacks import PrintSample
from .data import CharLMDataModule, TextClassificationDataModule, Vocabulary, WordLMDataModule
from .models import LanguageModel, SequenceClassifier, build_rnn, sync_batch_norm

__all__ = [
    "CharLMDataModule",
    "LanguageModel",
    "PrintSample",
    "SequenceClassifier",
    "TextClassificationDataModule",
    "Vocabulary",
    "WordLMDataModule",
    "build_rnn",
    "sync_batch_norm",
]
