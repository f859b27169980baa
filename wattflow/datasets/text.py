"""`dataset: text`: plain UTF-8 text for a language model, tokenized by characters.

`path` is a UTF-8 file or a directory of `.txt` files (read in name order, joined by blank lines). Without a
path the embedded corpus is the English documentation text that ships inside CPython's standard library
(`pydoc_data.topics`: the language reference topics behind `help()`, ~0.5 M characters): every Python
install has it, so nothing is downloaded, and it is real technical English prose with code.

The vocabulary is every character of the corpus (sorted), recorded with the model as its preprocessing so
that deployment encodes text the same way. The token stream is cut by position, in order, into train, val
and test parts (`data.val_fraction`, `data.test_fraction`). A sample is a window of `data.block_size` tokens
and its targets, the same window shifted by one: val and test windows tile their part; train windows start at
positions drawn from `data.seed`, as many as tile the train part (the DistributedSampler shards them per rank).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from wattflow.config import DataConfig
from wattflow.data import DATASETS, DataError, Splits

EMBEDDED = "pydoc_data.topics"
MIN_WINDOWS = 4  # per split: fewer cannot make a batch for training, validation and the test


def embedded_corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_corpus(path: str | None) -> tuple[str, str]:
    """(text, source) of `path` (a file or a folder of .txt files) or of the embedded corpus."""
    if path is None:
        return embedded_corpus(), EMBEDDED
    root = Path(path)
    if root.is_dir():
        files = sorted(root.rglob("*.txt"))
        if not files:
            raise DataError(f"data.path {root}: a folder with no .txt files; put UTF-8 text files (*.txt) in it")
    elif root.is_file():
        files = [root]
    else:
        raise DataError(f"data.path {root} does not exist; point it at a UTF-8 text file or a folder of .txt files")
    parts = []
    for f in files:
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(f"data.path {f} is not UTF-8 text (byte {err.start}: {err.reason}); convert it to "
                            "UTF-8 or remove it") from None
    text = "\n\n".join(parts)
    if not text.strip():
        raise DataError(f"data.path {root} holds no text (empty or whitespace only)")
    return text, str(root.resolve())


class TextWindows(Dataset):
    """Windows of `block_size` tokens starting at `starts`, and their next-token targets."""

    def __init__(self, tokens: np.ndarray, block_size: int, starts: np.ndarray):
        self.tokens, self.block_size, self.starts = tokens, block_size, starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i])
        window = torch.from_numpy(self.tokens[s:s + self.block_size + 1])
        return window[:-1], window[1:]


@DATASETS.register("text")
def text(data: DataConfig) -> Splits:
    corpus, source = read_corpus(data.path)
    vocab = "".join(sorted(set(corpus)))
    lookup = {ch: i for i, ch in enumerate(vocab)}
    tokens = np.fromiter((lookup[ch] for ch in corpus), dtype=np.int64, count=len(corpus))
    block = data.block_size
    n_test, n_val = int(len(tokens) * data.test_fraction), int(len(tokens) * data.val_fraction)
    parts = {"train": tokens[:len(tokens) - n_val - n_test], "val": tokens[len(tokens) - n_val - n_test:-n_test],
             "test": tokens[len(tokens) - n_test:]}
    for name, part in parts.items():
        if (len(part) - 1) // block < MIN_WINDOWS:
            raise DataError(f"data.path {source}: the {name} part has {len(part)} characters, fewer than "
                            f"{MIN_WINDOWS} windows of data.block_size={block} (+1); give more text or lower "
                            "block_size")

    def tiles(part: np.ndarray) -> TextWindows:
        return TextWindows(part, block, np.arange(0, len(part) - block, block))

    train = parts["train"]
    rng = np.random.default_rng(data.seed)
    starts = rng.integers(0, len(train) - block, size=(len(train) - 1) // block)
    digest = hashlib.sha256(corpus.encode()).hexdigest()[:16]
    return Splits(TextWindows(train, block, starts), tiles(parts["val"]), tiles(parts["test"]),
                  num_classes=len(vocab), input_shape=(block,), input_dtype="int64",
                  preprocessing={"tokenizer": "char", "vocab": vocab},
                  identity={"name": Path(source).stem if data.path else "pydoc-topics", "source": source,
                            "digest": digest})


def encode(text_: str, vocab: str) -> list[int]:
    lookup = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted(set(text_) - set(lookup))
    if unknown:
        raise ValueError(f"characters {unknown!r} are not in the model's vocabulary")
    return [lookup[ch] for ch in text_]


def decode(tokens, vocab: str) -> str:
    return "".join(vocab[int(t)] for t in tokens)
