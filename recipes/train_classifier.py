"""Train a (normalized) recurrent text classifier with LightningCLI.

    python recipes/train_classifier.py fit --config configs/cls_mr_polarity_ln_lstm.yaml --data.path ../shared/data/mr_polarity.tsv
    python recipes/train_classifier.py test --config configs/cls_mr_polarity_ln_lstm.yaml --data.path ../shared/data/mr_polarity.tsv --ckpt_path last

Subcommands: fit, validate, test (Lightning's own). The vocabulary, the number of classes and
their names are linked from the DataModule to the model, whose ``predict_step`` gives each
sample's predicted label by name: ``trainer.predict(model, dataloader)`` from Python.
"""

from seqnorm.lightning.cli import ClassifierCLI


def main(args=None, run=True):
    return ClassifierCLI(args=args, run=run)


if __name__ == "__main__":
    main()
