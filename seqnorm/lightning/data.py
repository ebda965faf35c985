"""DataModules for character- and word-level language modelling and text classification.

All text is loaded through Hugging Face ``datasets``: a hub name for users with internet, or a
local file (plain text, csv/tsv, json, parquet). The vocabulary is built from the training text
the first time it is needed and travels with the model's hyperparameters, so a checkpoint alone
can be evaluated or sampled.
"""

from __future__ import annotations

import codecs
import collections
import os
import re
import warnings

import lightning as L
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ..checks import check_int

LOCAL_FORMATS = {
    ".txt": "text",
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """The held-out shares of a file: each in (0, 1), together under 1."""
    if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
        raise ValueError(
            "Expected `val_fraction` and `test_fraction` in (0, 1) with sum < 1, got "
            f"val_fraction={val_fraction!r} and test_fraction={test_fraction!r}"
        )


def load_local(path: str, encoding: str = "utf-8", column_names: list[str] | None = None, **kwargs):
    """A local file as a ``datasets.Dataset`` (its single ``train`` split), checked first.

    Text files are read in ``encoding``; ``column_names`` names the columns of a csv/tsv file that
    has no header row, in order.
    """
    import datasets

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Expected argument `path` to be an existing file, got {path!r}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"Expected argument `path` to be a non-empty file, got empty {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in LOCAL_FORMATS:
        raise ValueError(
            f"Expected argument `path` to end in one of {sorted(LOCAL_FORMATS)}, got {path!r}"
        )
    if ext != ".parquet":
        check_encoding(path, encoding)
        kwargs["encoding"] = encoding
    if ext == ".tsv":
        kwargs.setdefault("delimiter", "\t")
    if column_names is not None:
        if ext not in (".csv", ".tsv"):
            raise ValueError(
                f"Expected argument `column_names` only for a csv or tsv file without a header "
                f"row, got column_names={column_names!r} for {path!r}"
            )
        kwargs["column_names"] = list(column_names)
    return datasets.load_dataset(LOCAL_FORMATS[ext], data_files=path, split="train", **kwargs)


def check_encoding(path: str, encoding: str, chunk: int = 1 << 20) -> None:
    """Raise a ValueError naming the file, the byte offset and the fix if ``path`` is not valid
    text in ``encoding`` (read in chunks: large files are never held whole)."""
    try:
        decoder = codecs.getincrementaldecoder(encoding)()
    except LookupError:
        raise ValueError(
            f"Expected argument `encoding` to name a text encoding, got {encoding!r}"
        ) from None
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                at = offset + error.start
                raise ValueError(
                    f"{path!r} is not valid {encoding} text: the bytes at offset {at} "
                    f"({error.object[error.start : error.start + 4]!r}) cannot be decoded. Set the "
                    "data module's `encoding` argument to the file's encoding (for example "
                    "'latin-1' or 'cp1252'), or save the file as UTF-8"
                ) from None
            if not block:
                return
            offset += len(block)


def load_hub(name: str, config: str | None = None):
    """All splits of a hub data set (needs internet)."""
    import datasets

    return datasets.load_dataset(name, config)


def python_docs_text() -> str:
    """About 465 K characters of English documentation that ship with Python itself."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class Vocabulary:
    """Token <-> id. Index 0 is ``<pad>``, 1 is ``<unk>``; tokens sorted by count, then by text."""

    PAD, UNK = "<pad>", "<unk>"

    def __init__(self, tokens: list[str]):
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, counts: collections.Counter, min_freq: int = 1, max_size: int | None = None):
        kept = sorted(
            (t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t)
        )
        return cls([cls.PAD, cls.UNK, *kept[: None if max_size is None else max_size - 2]])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens) -> list[int]:
        unk = self.index[self.UNK]
        return [self.index.get(t, unk) for t in tokens]

    def decode(self, ids, sep: str = "") -> str:
        return sep.join(self.tokens[i] for i in ids)


class StreamBatches(Dataset):
    """A token stream cut into ``batch_size`` parallel streams, read ``bptt`` tokens at a time.

    Item ``k`` is the ``(batch_size, bptt + 1)`` window ``k`` of every stream, so consecutive
    items continue each other and a language model can carry its hidden state across them
    (truncated backpropagation through time). Under data parallelism, process ``rank`` of
    ``world`` takes every ``world``-th stream.
    """

    def __init__(
        self, ids: torch.Tensor, batch_size: int, bptt: int, rank: int = 0, world: int = 1
    ):
        streams = batch_size * world
        length = (len(ids) - 1) // streams
        if length < 2:
            raise ValueError(
                f"Expected at least {2 * streams + 1} tokens for batch_size={batch_size} on "
                f"{world} process(es), got {len(ids)}"
            )
        self.data = ids[: streams * length + 1]
        self.starts = torch.arange(rank, streams, world) * length  # (batch_size,)
        self.length, self.bptt = length, bptt

    def __len__(self) -> int:
        return -(-(self.length - 1) // self.bptt)

    def __getitem__(self, k: int) -> torch.Tensor:
        lo = k * self.bptt
        width = min(self.bptt, self.length - lo) + 1
        index = self.starts.unsqueeze(1) + lo + torch.arange(width)  # (batch_size, width)
        return self.data[index]


class LMDataModule(L.LightningDataModule):
    """Loading and batching shared by the language-model DataModules (the recipe's base class:
    ``--data`` takes any subclass)."""

    level: str

    def __init__(
        self,
        path: str | None = None,
        hub: str | None = None,
        hub_config: str | None = None,
        text_field: str = "text",
        batch_size: int = 32,
        bptt: int = 100,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        min_freq: int = 1,
        max_vocab: int | None = None,
        encoding: str = "utf-8",
    ):
        super().__init__()
        if path is not None and hub is not None:
            raise ValueError(f"Expected one of `path` or `hub`, got path={path!r} and hub={hub!r}")
        check_int(batch_size, "batch_size")
        check_int(bptt, "bptt")
        check_fractions(val_fraction, test_fraction)
        self.path, self.hub, self.hub_config, self.text_field = path, hub, hub_config, text_field
        self.batch_size, self.bptt = batch_size, bptt
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.min_freq, self.max_vocab, self.encoding = min_freq, max_vocab, encoding
        self._splits: dict[str, list[str]] | None = None
        self._vocab: Vocabulary | None = None

    def tokenize(self, text: str) -> list[str]:
        raise NotImplementedError

    def _texts(self) -> dict[str, str]:
        """The raw text of each split."""
        if self.hub is not None:
            splits = load_hub(self.hub, self.hub_config)
            join = lambda split: "\n".join(splits[split][self.text_field])
            return {"train": join("train"), "val": join("validation"), "test": join("test")}
        if self.path is None:
            text = python_docs_text()
        else:
            data = (
                load_local(self.path, self.encoding, sample_by="document")
                if self.path.endswith(".txt")
                else load_local(self.path, self.encoding)
            )
            if self.text_field not in data.column_names:
                raise ValueError(
                    f"Expected a column `text_field`={self.text_field!r} in {self.path!r}, "
                    f"got columns {data.column_names}"
                )
            text = "\n".join(data[self.text_field])
        n = len(text)
        a = int(n * (1 - self.val_fraction - self.test_fraction))
        b = int(n * (1 - self.test_fraction))
        return {"train": text[:a], "val": text[a:b], "test": text[b:]}

    def _load(self) -> None:
        if self._splits is None:
            self._splits = {k: self.tokenize(v) for k, v in self._texts().items()}
            counts = collections.Counter(self._splits["train"])
            self._vocab = Vocabulary.build(counts, self.min_freq, self.max_vocab)
            self._ids = {k: torch.tensor(self._vocab.encode(v)) for k, v in self._splits.items()}

    @property
    def vocab(self) -> list[str]:
        """The tokens, index = id (linked to the model in the recipes)."""
        self._load()
        return self._vocab.tokens

    def setup(self, stage: str | None = None) -> None:
        self._load()
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        )
        self.datasets = {}
        for split, tokens in self._splits.items():
            try:
                self.datasets[split] = StreamBatches(
                    self._ids[split],
                    self.batch_size,
                    self.bptt,
                    *((rank, world) if split == "train" else (0, 1)),
                )
            except ValueError as error:
                source = self.path or self.hub or "Python's documentation"
                unit = "characters" if self.level == "char" else "words"
                raise ValueError(
                    f"The {split} split of {source} holds {len(tokens)} {unit}, too few for one "
                    f"batch of batch_size={self.batch_size} streams ({error}). Use a smaller "
                    "batch_size, a larger file, or (for val/test) a larger val_fraction/test_fraction"
                ) from None

    def state_dict(self) -> dict:
        """How the training stream is cut into batches, saved in checkpoints: the loader's saved
        position counts windows of that layout."""
        world = self.trainer.world_size if self.trainer else 1
        return {"batch_size": self.batch_size, "bptt": self.bptt, "world_size": world}

    def load_state_dict(self, state: dict) -> None:
        """Warns when a run resumes with another layout: it then goes on from another place in
        the data, with a fresh hidden state, rather than where it stopped."""
        now = self.state_dict()
        changed = [
            f"{k}={state[k]} then, {now[k]} now" for k in now if state.get(k, now[k]) != now[k]
        ]
        if changed:
            warnings.warn(
                f"Resuming with another cut of the training stream ({'; '.join(changed)}): the run "
                "goes on from another place in the data, with a fresh hidden state, not from where "
                "the checkpoint stopped",
                UserWarning,
                stacklevel=2,
            )

    def _loader(self, split: str) -> StatefulDataLoader:
        # batch_size=None: each item is already a batch; order is fixed to carry the hidden state.
        return StatefulDataLoader(self.datasets[split], batch_size=None, shuffle=False)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")


class CharLMDataModule(LMDataModule):
    """Character-level language modelling data.

    With neither ``path`` nor ``hub``, the text is Python's own documentation (``pydoc_data``),
    so the default runs offline. A local file is split 90/5/5 into train/val/test in order; a hub
    data set uses its own train/validation/test splits.

    Example:
        >>> dm = CharLMDataModule(batch_size=4, bptt=50)
        >>> dm.setup()
        >>> dm.train_dataloader().dataset[0].shape
        torch.Size([4, 51])
    """

    level = "char"

    def tokenize(self, text: str) -> list[str]:
        return list(text)


class WordLMDataModule(LMDataModule):
    """Word-level language modelling data: whitespace words, ``<eos>`` at each line end.

    Words rarer than ``min_freq`` (or beyond ``max_vocab``) become ``<unk>``.
    """

    level = "word"

    def tokenize(self, text: str) -> list[str]:
        return [w for line in text.split("\n") if line.strip() for w in [*line.split(), "<eos>"]]


def _labelled(values) -> bool:
    """Whether a split has labels (SST-2's test split marks them missing with -1)."""
    return all(not (isinstance(v, int) and v < 0) for v in values)


def label_classes(
    labels: dict[str, list], names: list[str] | None, num_classes: int | None, column: str, source
) -> tuple[list[str], dict[str, list[int]]]:
    """The class names and each split's class ids, from labels that are whole numbers, the
    names of a ``ClassLabel`` (``names``), or strings (classes in sorted order of the training
    split's). Anything else, a fractional number or a label outside the classes, is an error
    naming the label, its split and what was expected."""

    def fail(value, split, expected):
        raise ValueError(
            f"Expected {expected} in column {column!r} of {source!r}, got {value!r} in the "
            f"{split} split"
        )

    train = labels["train"]
    if names is None and train and all(isinstance(v, str) for v in train):
        names = sorted(set(train))
        if num_classes is not None and num_classes != len(names):
            fail(num_classes, "train", f"num_classes={len(names)} (the label names {names})")
        index = {name: i for i, name in enumerate(names)}
        ids = {}
        for split, values in labels.items():
            for v in values:
                if v not in index:
                    fail(v, split, f"one of the training split's labels {names}")
            ids[split] = [index[v] for v in values]
        return names, ids
    for split, values in labels.items():
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
                fail(v, split, "whole-number labels (or strings in every row)")
    count = len(names) if names is not None else num_classes
    if count is None:
        count = max(2, int(max(train)) + 1 if train else 2)
    for split, values in labels.items():
        for v in values:
            if not 0 <= v < count:
                fail(
                    int(v) if isinstance(v, float) else v,
                    split,
                    f"labels in [0, {count - 1}] (num_classes={count})",
                )
    names = names if names is not None else [str(i) for i in range(count)]
    return names, {split: [int(v) for v in values] for split, values in labels.items()}


WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks."""
    return WORD.findall(text.lower())


class TextClassificationDataModule(L.LightningDataModule):
    """Sentences or documents with labels, padded per batch with their lengths.

    Local files (csv/tsv/json/parquet) are shuffled with ``seed`` and split into train/val/test by
    ``val_fraction``/``test_fraction``; hub data sets keep their splits (one without a test split,
    or with unlabelled test rows like SST-2, tests on its validation split).

    Labels may be whole numbers (classes ``0 .. num_classes - 1``), the names of a data set's
    ``ClassLabel``, or strings ("pos"/"neg"): strings become classes in sorted order. The names
    (``label_names``) travel with the model into its checkpoint, and predictions are names.
    ``num_classes`` is read from the data unless given. A csv/tsv file without a header row
    names its columns with ``column_names`` (for example ``[label, text]``).

    Batches are ``(tokens (N, L), lengths (N,), labels (N,))``. ``predict_path`` names a text
    file of documents to classify, one per line, in ``encoding`` (the ``predict`` subcommand;
    their labels are -1); the vocabulary still comes from the training split.
    """

    def __init__(
        self,
        path: str | None = None,
        hub: str | None = None,
        hub_config: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        num_classes: int | None = None,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        min_freq: int = 2,
        max_vocab: int | None = 20000,
        max_length: int = 400,
        seed: int = 0,
        encoding: str = "utf-8",
        column_names: list[str] | None = None,
        predict_path: str | None = None,
    ):
        super().__init__()
        if (path is None) == (hub is None):
            raise ValueError(
                f"Expected exactly one of `path` or `hub`, got path={path!r}, hub={hub!r}"
            )
        check_int(batch_size, "batch_size")
        check_int(max_length, "max_length")
        check_fractions(val_fraction, test_fraction)
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"Expected argument `num_classes` to be at least 2, got {num_classes}")
        self.path, self.hub, self.hub_config = path, hub, hub_config
        self.text_column, self.label_column = text_column, label_column
        self.batch_size, self.seed = batch_size, seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.min_freq, self.max_vocab, self.max_length = min_freq, max_vocab, max_length
        self.encoding, self.column_names = encoding, column_names
        self.predict_path = predict_path
        self.predicted_documents: list[str] | None = None  # as the last predict loader read them
        self._num_classes = num_classes
        self._splits = None
        self._vocab: Vocabulary | None = None
        self._label_names: list[str] | None = None

    def _raw(self):
        if self.hub is not None:
            data = load_hub(self.hub, self.hub_config)
            test = data.get("test")
            if test is not None and not _labelled(test[self.label_column]):
                test = None
            val = data.get("validation")
            if val is None:
                parts = data["train"].train_test_split(self.val_fraction, seed=self.seed)
                data, val = {"train": parts["train"]}, parts["test"]
            return {"train": data["train"], "val": val, "test": test if test is not None else val}
        data = load_local(self.path, self.encoding, self.column_names)
        for arg, column in (("text_column", self.text_column), ("label_column", self.label_column)):
            if column not in data.column_names:
                hint = (
                    ""
                    if self.column_names
                    else "; if the file has no header row, name its columns in order with the "
                    "data module's `column_names` argument (for example [label, text])"
                )
                raise ValueError(
                    f"Expected a column `{arg}`={column!r} in {self.path!r}, got columns "
                    f"{data.column_names}{hint}"
                )
        held = data.train_test_split(self.val_fraction + self.test_fraction, seed=self.seed)
        rest = held["test"].train_test_split(
            self.test_fraction / (self.val_fraction + self.test_fraction), seed=self.seed
        )
        return {"train": held["train"], "val": rest["train"], "test": rest["test"]}

    def _load(self) -> None:
        if self._splits is not None:
            return
        raw = self._raw()
        feature = raw["train"].features.get(self.label_column)
        names = list(feature.names) if hasattr(feature, "names") else None  # a ClassLabel
        labels = {split: list(data[self.label_column]) for split, data in raw.items()}
        self._label_names, ids = label_classes(
            labels, names, self._num_classes, self.label_column, self.path or self.hub
        )
        docs = {
            split: [words(t)[: self.max_length] or ["<unk>"] for t in data[self.text_column]]
            for split, data in raw.items()
        }
        self._vocab = Vocabulary.build(
            collections.Counter(w for doc in docs["train"] for w in doc),
            self.min_freq,
            self.max_vocab,
        )
        self._splits = {
            split: [
                (torch.tensor(self._vocab.encode(doc)), y)
                for doc, y in zip(docs[split], ids[split])
            ]
            for split in raw
        }

    @property
    def label_names(self) -> list[str]:
        """The name of each class, index = class (linked to the model in the recipe)."""
        self._load()
        return self._label_names

    @property
    def num_classes(self) -> int:
        self._load()
        return len(self._label_names)

    @property
    def vocab(self) -> list[str]:
        self._load()
        return self._vocab.tokens

    def setup(self, stage: str | None = None) -> None:
        self._load()

    @staticmethod
    def collate(items):
        docs, labels = zip(*items)
        lengths = torch.tensor([len(d) for d in docs])
        tokens = torch.nn.utils.rnn.pad_sequence(list(docs), batch_first=True)  # 0 = <pad>
        return tokens, lengths, torch.tensor(labels)

    def _loader(self, split: str, shuffle: bool) -> StatefulDataLoader:
        # Training drops a last partial batch: a batch of one has no batch-norm statistics.
        return StatefulDataLoader(
            self._splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(self._splits[split]) > self.batch_size,
            collate_fn=self.collate,
        )

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)

    def predict_documents(self) -> list[str]:
        """The lines of ``predict_path``, the documents to classify."""
        if self.predict_path is None:
            raise ValueError(
                "Expected argument `predict_path` (a text file of documents to classify, one per "
                "line) for predict, got None"
            )
        if not os.path.isfile(self.predict_path):
            raise FileNotFoundError(
                f"Expected argument `predict_path` to name a file, got {self.predict_path!r}"
            )
        check_encoding(self.predict_path, self.encoding)
        with open(self.predict_path, encoding=self.encoding) as f:
            return f.read().splitlines()

    def predict_dataloader(self):
        self._load()
        self.predicted_documents = self.predict_documents()  # what predictions are paired with
        docs = [words(t)[: self.max_length] or ["<unk>"] for t in self.predicted_documents]
        items = [(torch.tensor(self._vocab.encode(doc)), -1) for doc in docs]
        return StatefulDataLoader(items, batch_size=self.batch_size, collate_fn=self.collate)
