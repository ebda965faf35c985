"""Train a (normalized) recurrent text classifier with LightningCLI.

    python recipes/train_classifier.py fit --config configs/cls_mr_polarity_ln_lstm.yaml --data.path ../shared/data/mr_polarity.tsv
    python recipes/train_classifier.py test --config configs/cls_mr_polarity_ln_lstm.yaml --data.path ../shared/data/mr_polarity.tsv --ckpt_path last

Subcommands: fit, validate, test, predict (the predicted label of each sample, by name). The
vocabulary, the number of classes and their names are linked from the DataModule to the model.
"""

from lightning.pytorch.cli import LightningCLI

from seqnorm.lightning import SequenceClassifier, TextClassificationDataModule, check_checkpoint


class ClassifierCLI(LightningCLI):
    def parse_arguments(self, parser, args):  # a bad --ckpt_path fails before anything else
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            check_checkpoint(self.config[subcommand].get("ckpt_path"), SequenceClassifier)

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.label_names", "model.label_names", apply_on="instantiate")


def main(args=None, run=True):
    return ClassifierCLI(
        SequenceClassifier,
        TextClassificationDataModule,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
