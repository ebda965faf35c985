"""The Lightning training layer: LightningModules and DataModules (needs the ``train`` extra)."""

from .callbacks import PrintSample
from .data import (
    CharLMDataModule,
    LMDataModule,
    TextClassificationDataModule,
    Vocabulary,
    WordLMDataModule,
)
from .models import (
    LanguageModel,
    SequenceClassifier,
    build_rnn,
    check_checkpoint,
    check_generation,
    sync_batch_norm,
)

__all__ = [
    "CharLMDataModule",
    "LMDataModule",
    "LanguageModel",
    "PrintSample",
    "SequenceClassifier",
    "TextClassificationDataModule",
    "Vocabulary",
    "WordLMDataModule",
    "build_rnn",
    "check_checkpoint",
    "check_generation",
    "sync_batch_norm",
]
