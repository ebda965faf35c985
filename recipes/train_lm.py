"""Train a (normalized) recurrent language model with LightningCLI.

    python recipes/train_lm.py fit --config configs/char_lm_pydoc_ln_lstm.yaml
    python recipes/train_lm.py fit --config configs/char_lm_pydoc_ln_lstm.yaml --ckpt_path last  # resume
    python recipes/train_lm.py test --config configs/char_lm_pydoc_ln_lstm.yaml --ckpt_path last

Subcommands: fit, validate, test (Lightning's own). The model's vocabulary and level are linked
from the DataModule. After ``fit`` the ``PrintSample`` callback prints the validation bits per
character (or perplexity) and a text sample. Sample from a checkpoint with ``recipes/generate.py``.
"""

from seqnorm.lightning.cli import LMCLI


def main(args=None, run=True):
    return LMCLI(args=args, run=run)


if __name__ == "__main__":
    main()
