"""Callbacks for the recipes."""

import lightning as L

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
