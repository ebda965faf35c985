"""Train a (normalized) recurrent language model with LightningCLI.

    python recipes/train_lm.py fit --config configs/char_lm_pydoc_ln_lstm.yaml
    python recipes/train_lm.py fit --config configs/char_lm_pydoc_ln_lstm.yaml --ckpt_path last  # resume
    python recipes/train_lm.py test --config configs/char_lm_pydoc_ln_lstm.yaml --ckpt_path last

Subcommands: fit, validate, test (Lightning's own). The model's vocabulary and level are linked
from the DataModule. After ``fit`` the ``PrintSample`` callback prints the validation bits per
character (or perplexity) and a text sample. Sample from a checkpoint with ``recipes/generate.py``.
"""

from lightning.pytorch.cli import LightningCLI

from seqnorm.lightning import LanguageModel, LMDataModule, check_checkpoint


class LMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")
        parser.link_arguments("data.level", "model.level", apply_on="instantiate")

    def parse_arguments(self, parser, args):  # a bad --ckpt_path fails before anything else
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint(self.config[subcommand].get("ckpt_path"), LanguageModel)


def main(args=None, run=True):
    return LMCLI(
        LanguageModel,
        LMDataModule,
        subclass_mode_data=True,
        # Batches are consecutive windows of fixed streams; the DataModule shards them by rank.
        trainer_defaults={"use_distributed_sampler": False},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
