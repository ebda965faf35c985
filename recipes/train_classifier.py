"""Train a (normalized) recurrent text classifier with LightningCLI.

    python recipes/train_classifier.py fit --config configs/cls_mr_polarity_ln_lstm.yaml --data.path ../shared/data/mr_polarity.tsv
    python recipes/train_classifier.py test --config configs/cls_mr_polarity_ln_lstm.yaml --data.path ../shared/data/mr_polarity.tsv --ckpt_path last

    python recipes/train_classifier.py predict --config configs/cls_mr_polarity_ln_lstm.yaml --data.path ../shared/data/mr_polarity.tsv --ckpt_path last --data.predict_path my_sentences.txt

Subcommands: fit, validate, test, predict (Lightning's own). The vocabulary, the number of classes
and their names are linked from the DataModule to the model; a checkpoint must meet the data it
was trained on (the vocabulary comes from the training split). ``predict`` classifies each line
of ``--data.predict_path`` and writes ``label<TAB>line`` to ``predictions.tsv`` in the trainer's
``default_root_dir``.
"""

from seqnorm.lightning.cli import ClassifierCLI


def main(args=None, run=True):
    return ClassifierCLI(args=args, run=run)


if __name__ == "__main__":
    main()
