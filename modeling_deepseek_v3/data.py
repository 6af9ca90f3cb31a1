"""Text data for pretraining and fine-tuning, in the manner of transformers' `run_clm.py`, fully offline.

    documents (files, directories, glob patterns; or a `datasets` dataset)
      -> held-out split by document (seeded)
      -> tokenizer (a local one, or a byte-level BPE trained here on the training documents)
      -> token ids per document
      -> blocks of `block_size` tokens: documents concatenated with the EOS id between them, the last
         incomplete block dropped
      -> examples {"input_ids", "labels", "attention_mask"}, each a LongTensor [T]

Shape legend: N blocks, T = block_size.

Two datasets give the same blocks in the same order from the same documents:

- `PackedBlockDataset` (map-style) tokenizes everything once and holds the blocks in one [N, T] tensor, for corpora
  that fit in memory; the Trainer's sampler shuffles it.
- `StreamingBlockDataset` (iterable) reads, tokenizes and packs a few documents at a time, so memory stays at a few
  documents plus one block whatever the corpus size; it yields in document order.

Labels are the input ids: the model shifts them inside its loss. Attention crosses document boundaries inside a
block (as in `run_clm.py`); the EOS token between documents is what tells the model a new one starts.

The default corpus is the Python standard library's own sources and text files (`stdlib_files()`), which exist
on every machine, so the examples and tests need no download.
"""

import argparse
import glob
import os
import random
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
"""File suffixes taken from a directory given as a source (files named explicitly are always taken)."""

SKIPPED_DIRECTORIES = ("__pycache__", "site-packages", "dist-packages")
"""Directory names never descended into when a directory is given as a source."""

STDLIB_TEST_DIRECTORIES = ("test", "tests", "idle_test")
"""Left out of the default corpus: test data there includes deliberately malformed and non-UTF-8 files."""

SPECIAL_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"}
"""Special tokens of a tokenizer trained here, in id order 0, 1, 2 (the presets' `bos_token_id` 0, `eos_token_id` 1)."""

DEFAULT_VALIDATION_FRACTION = 0.05
DEFAULT_SEED = 0
"""Defaults of the held-out split, shared by the training and evaluation examples so that both see the same split."""


# ---------------------------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The default corpus: every `TEXT_SUFFIXES` file of this Python's standard library
    (`sysconfig.get_paths()["stdlib"]`), sorted, without installed packages and test directories."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [
        path for path in resolve_files([root])
        if not any(part in STDLIB_TEST_DIRECTORIES for part in path.relative_to(root).parts)
    ]


def resolve_files(sources: Iterable[str | Path], suffixes: Sequence[str] = TEXT_SUFFIXES) -> list[Path]:
    """Expand `sources` into a sorted list of distinct files.

    Args:
        sources: each a file (taken as is), a directory (every file below it whose suffix is in `suffixes`,
            skipping `SKIPPED_DIRECTORIES`) or a glob pattern (`*`, `?`, `[...]`, `**` for any depth).
        suffixes: file suffixes taken from directories.

    Returns:
        The files, sorted by path, each once.

    Raises:
        FileNotFoundError: a source that is neither an existing file or directory nor a pattern matching a file,
            or a directory holding no file with one of `suffixes`.
    """
    files = set()
    for source in sources:
        path = Path(source)
        if path.is_file():
            files.add(path)
        elif path.is_dir():
            found = _files_below(path, suffixes)
            if not found:
                raise FileNotFoundError(f"directory {str(path)!r} holds no file ending in one of {list(suffixes)}")
            files.update(found)
        elif glob.has_magic(str(source)):
            found = [Path(match) for match in glob.glob(str(source), recursive=True) if Path(match).is_file()]
            if not found:
                raise FileNotFoundError(f"glob pattern {str(source)!r} matches no file")
            files.update(found)
        else:
            raise FileNotFoundError(f"text source {str(path)!r} does not exist "
                                    "(expected a file, a directory or a glob pattern)")
    return sorted(files)


def _files_below(directory: Path, suffixes: Sequence[str]) -> list[Path]:
    found = []
    for root, subdirectories, names in os.walk(directory):
        # Pruned in place, so that a stdlib walk never enters site-packages (tens of thousands of files).
        subdirectories[:] = [name for name in subdirectories if name not in SKIPPED_DIRECTORIES]
        found.extend(Path(root, name) for name in names if os.path.splitext(name)[1] in suffixes)
    return [path for path in found if path.is_file()]


def read_document(path: str | Path) -> str:
    """The text of one file, read as UTF-8 (universal newlines), one document.

    Raises:
        ValueError: the file is not UTF-8 text (the message names it).
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: expected UTF-8 text, found undecodable bytes ({error.reason} at byte "
                         f"{error.start}); leave this file out of the sources") from error


class TextFileCorpus:
    """A re-iterable, lazily read collection of text files, one document per file: iterating reads one file at a
    time (nothing is cached), so it can be passed around like a list of strings without holding the texts.

    Args:
        files: the files, in the order they are to be read.
    """

    def __init__(self, files: Sequence[str | Path]):
        self.files = [Path(file) for file in files]

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[str]:
        for file in self.files:
            yield read_document(file)

    def __repr__(self) -> str:
        return f"TextFileCorpus({len(self.files)} files)"


def load_dataset_documents(
    name: str,
    config_name: str | None = None,
    split: str = "train",
    text_column: str = "text",
    data_files: str | Sequence[str] | None = None,
) -> list[str]:
    """The non-empty texts of one column of a `datasets` dataset, one document per row.

    Needs the optional `datasets` package. Offline use: a local builder such as `name="text"` or `"json"` with
    `data_files`, or a dataset already in the `datasets` cache with `HF_DATASETS_OFFLINE=1`.

    Args:
        name, config_name, split, data_files: passed to `datasets.load_dataset`.
        text_column: the column holding the text.

    Returns:
        The texts, in dataset order, empty ones left out.

    Raises:
        ImportError: `datasets` is not installed.
        KeyError: the dataset has no column `text_column`.
        TypeError: a value of that column is not a string.
    """
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"reading the dataset {name!r} needs the optional `datasets` package, which is not installed: "
            "`pip install datasets`, or give text files instead"
        ) from error
    dataset = datasets.load_dataset(name, config_name, split=split, data_files=data_files)
    if text_column not in dataset.column_names:
        raise KeyError(f"dataset {name!r} (split {split!r}) has no column {text_column!r}; "
                       f"its columns are {dataset.column_names}")
    documents = []
    for row, text in enumerate(dataset[text_column]):
        if not isinstance(text, str):
            raise TypeError(f"dataset {name!r} column {text_column!r} row {row}: expected a string, "
                            f"found {type(text).__name__}")
        if text:
            documents.append(text)
    return documents


def split_documents(documents: Sequence, validation_fraction: float, seed: int = DEFAULT_SEED) -> tuple[list, list]:
    """Hold out whole documents for validation.

    Args:
        documents: anything indexable (file paths, texts); each item is one document.
        validation_fraction: share held out, in [0, 1). At least one document is held out when the fraction is
            positive and there are two or more documents.
        seed: the same seed and the same `documents` give the same split on every machine.

    Returns:
        `(train, validation)`: disjoint lists that together hold every item once, each in the input order.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    count = len(documents)
    held_out_count = 0
    if validation_fraction > 0 and count >= 2:
        held_out_count = min(count - 1, max(1, round(count * validation_fraction)))
    held_out = set(random.Random(seed).sample(range(count), held_out_count))
    train = [documents[i] for i in range(count) if i not in held_out]
    validation = [documents[i] for i in range(count) if i in held_out]
    return train, validation


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def train_bpe_tokenizer(
    documents: Iterable[str],
    vocab_size: int,
    save_directory: str | Path | None = None,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style: every byte is a token, so any text round-trips).

    Args:
        documents: the training texts; iterated once (a `TextFileCorpus` is read file by file).
        vocab_size: the largest vocabulary, special tokens and the 256 byte tokens included; a small corpus may
            give fewer merges.
        save_directory: if given, the tokenizer is saved there (`tokenizer.json`, `tokenizer_config.json`), and
            `AutoTokenizer.from_pretrained(save_directory)` reloads it.
        min_frequency: a pair is merged only if it occurs at least this often.
        show_progress: the `tokenizers` progress bar.

    Returns:
        A fast tokenizer with `SPECIAL_TOKENS` as ids 0 (bos), 1 (eos), 2 (pad). It adds no special tokens when
        encoding: packing puts EOS between documents itself.
    """
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is below {minimum} (the 256 byte tokens and "
                         f"{len(SPECIAL_TOKENS)} special tokens of a byte-level BPE)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    length = len(documents) if isinstance(documents, Sequence | TextFileCorpus) else None
    tokenizer.train_from_iterator(documents, trainer, length=length)
    # clean_up_tokenization_spaces would delete spaces before punctuation on decode and break the round trip.
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)
    if save_directory is not None:
        fast.save_pretrained(save_directory)
    return fast


def check_tokenizer_fits(tokenizer: PreTrainedTokenizerBase, vocab_size: int, source: str = "the tokenizer") -> None:
    """Raise a `ValueError` naming `source` unless the tokenizer has an EOS token (the document separator) and all
    its ids are below the model's `vocab_size`."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{source} has no eos_token: packing needs one to separate documents")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{source} has {len(tokenizer)} tokens, more than the model's vocab_size {vocab_size}")


def tokenize_documents(
    documents: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 64,
    progress: bool = True,
    description: str = "tokenizing",
) -> Iterator[list[int]]:
    """Token ids of each document, no special tokens added, in order.

    Args:
        documents: texts; read `batch_size` at a time, so a lazy source stays lazy.
        tokenizer: any transformers tokenizer (a fast one tokenizes each batch in parallel).
        batch_size: documents per tokenizer call.
        progress: a tqdm bar counting documents.

    Yields:
        One `list[int]` per document.
    """
    total = len(documents) if isinstance(documents, Sequence | TextFileCorpus) else None
    with tqdm(total=total, desc=description, unit="doc", disable=not progress) as bar:
        batch = []
        for text in documents:
            batch.append(text)
            if len(batch) == batch_size:
                yield from _encode(tokenizer, batch)
                bar.update(len(batch))
                batch = []
        if batch:
            yield from _encode(tokenizer, batch)
            bar.update(len(batch))


def _encode(tokenizer, texts):
    # verbose=False: a document longer than model_max_length is expected here (packing cuts it), not a problem.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------


class PackedBlocks(NamedTuple):
    """What `pack_token_ids` returns."""

    blocks: list[list[int]]
    """The complete blocks, each `block_size` ids."""
    dropped_tokens: int
    """Ids of the final incomplete block, left out."""


class _BlockPacker:
    """Incremental packing, shared by `pack_token_ids` and both datasets so that they cut identical blocks."""

    def __init__(self, block_size: int, eos_token_id: int):
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2 (one input and one next-token target), got {block_size}")
        self.block_size = block_size
        self.eos_token_id = eos_token_id
        self.pending = []  # the start of the next block, always shorter than block_size
        self.seen_document = False

    def add(self, ids: Sequence[int]) -> list[list[int]]:
        if len(ids) == 0:
            return []  # an empty document would put two EOS in a row
        if self.seen_document:
            self.pending.append(self.eos_token_id)
        self.seen_document = True
        need = self.block_size - len(self.pending)
        if len(ids) < need:
            self.pending.extend(ids)
            return []
        blocks = [self.pending + list(ids[:need])]
        start = need
        while start + self.block_size <= len(ids):
            blocks.append(list(ids[start:start + self.block_size]))
            start += self.block_size
        self.pending = list(ids[start:])
        return blocks


def pack_token_ids(documents_ids: Iterable[Sequence[int]], block_size: int, eos_token_id: int) -> PackedBlocks:
    """Pack documents into blocks of `block_size` ids.

    The stream is `doc_0, EOS, doc_1, EOS, ..., doc_last` (EOS between documents, none after the last; empty
    documents are skipped), cut every `block_size` ids. Every id of that stream lands in exactly one block, in
    order, except the final `len(stream) % block_size`, which are dropped and counted.

    Args:
        documents_ids: token ids of each document, e.g. from `tokenize_documents`.
        block_size: T, ids per block (>= 2).
        eos_token_id: the separator.

    Returns:
        `PackedBlocks(blocks, dropped_tokens)`: N blocks of T ids, and how many ids were dropped (< T).
    """
    packer = _BlockPacker(block_size, eos_token_id)
    blocks = []
    for ids in documents_ids:
        blocks.extend(packer.add(ids))
    return PackedBlocks(blocks, len(packer.pending))


def _example(block_T: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": block_T, "labels": block_T.clone(), "attention_mask": torch.ones_like(block_T)}


class PackedBlockDataset(Dataset):
    """Map-style dataset of packed blocks, tokenized once at construction and held in memory.

    Args:
        documents: texts (a list, a `TextFileCorpus`, ...), read once in order.
        tokenizer: any transformers tokenizer with an EOS token.
        block_size: T.
        max_blocks: stop after this many blocks (reading no further documents); None for all.
        progress: a tqdm bar while tokenizing.

    Item `i` is `{"input_ids", "labels", "attention_mask"}`, each a LongTensor [T]; labels equal input_ids (the
    model shifts), the mask is all ones (blocks are full). Attributes: `blocks` [N, T] int64; `dropped_tokens`,
    the size of the final incomplete block (None when `max_blocks` stopped the reading before the end).
    """

    def __init__(
        self,
        documents: Iterable[str],
        tokenizer: PreTrainedTokenizerBase,
        block_size: int,
        max_blocks: int | None = None,
        progress: bool = True,
    ):
        if tokenizer.eos_token_id is None:
            raise ValueError("PackedBlockDataset: the tokenizer has no eos_token to separate documents")
        packer = _BlockPacker(block_size, tokenizer.eos_token_id)
        chunks_NT, count = [], 0
        for ids in tokenize_documents(documents, tokenizer, progress=progress):
            new_blocks = packer.add(ids)
            if max_blocks is not None:
                new_blocks = new_blocks[:max_blocks - count]
            if new_blocks:
                # One tensor per document rather than a list of Python ints for the whole corpus: 8 bytes an id.
                chunks_NT.append(torch.tensor(new_blocks, dtype=torch.long))
                count += len(new_blocks)
            if max_blocks is not None and count >= max_blocks:
                self.dropped_tokens = None
                break
        else:
            self.dropped_tokens = len(packer.pending)
        self.block_size = block_size
        self.blocks = torch.cat(chunks_NT) if chunks_NT else torch.empty(0, block_size, dtype=torch.long)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return _example(self.blocks[index])


class StreamingBlockDataset(IterableDataset):
    """Iterable dataset of packed blocks: reads, tokenizes and packs `read_batch` documents at a time, so memory
    is bounded by a few documents and one block whatever the corpus size. Yields exactly the blocks of
    `PackedBlockDataset` on the same documents, in the same order, and starts over on every new iteration (epoch).

    Args:
        documents: a re-iterable source of texts (a `TextFileCorpus`, a list); not a one-shot iterator, since each
            epoch iterates it again.
        tokenizer: any transformers tokenizer with an EOS token.
        block_size: T.
        max_blocks: stop after this many blocks; None for all.
        read_batch: documents per tokenizer call.

    Yields `{"input_ids", "labels", "attention_mask"}`, each a LongTensor [T], as `PackedBlockDataset`. With
    DataLoader workers, worker w of W yields blocks w, w + W, ...: together one pass, each block once, though
    every worker tokenizes the whole stream. After a complete pass in this process, `dropped_tokens` holds the
    size of the final incomplete block.
    """

    def __init__(
        self,
        documents: Iterable[str],
        tokenizer: PreTrainedTokenizerBase,
        block_size: int,
        max_blocks: int | None = None,
        read_batch: int = 8,
    ):
        if iter(documents) is documents:
            raise TypeError("StreamingBlockDataset: documents must be re-iterable (a TextFileCorpus or a list), "
                            f"got a one-shot iterator {type(documents).__name__}")
        if tokenizer.eos_token_id is None:
            raise ValueError("StreamingBlockDataset: the tokenizer has no eos_token to separate documents")
        _BlockPacker(block_size, tokenizer.eos_token_id)  # validates block_size now rather than in a worker
        self.documents = documents
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.read_batch = read_batch
        self.dropped_tokens = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        shard, num_shards = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        packer = _BlockPacker(self.block_size, self.tokenizer.eos_token_id)
        index = 0
        for ids in tokenize_documents(self.documents, self.tokenizer, batch_size=self.read_batch, progress=False):
            for block in packer.add(ids):
                if self.max_blocks is not None and index >= self.max_blocks:
                    return
                if index % num_shards == shard:
                    yield _example(torch.tensor(block, dtype=torch.long))
                index += 1
        self.dropped_tokens = len(packer.pending)


# ---------------------------------------------------------------------------------------------------------------
# Command-line glue shared by examples/pretrain.py and examples/finetune.py
# ---------------------------------------------------------------------------------------------------------------


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the data options of the training examples: `--train-files`, `--dataset`, `--dataset-config`,
    `--dataset-split`, `--text-column`, `--validation-fraction`, `--block-size`, `--max-eval-blocks`,
    `--streaming`, `--seed`. `documents_from_args` and `block_datasets_from_args` read them."""
    group = parser.add_argument_group("data")
    group.add_argument("--train-files", nargs="+", metavar="PATH",
                       help="text files, directories or glob patterns, one document per file "
                            "(default: the Python standard library's sources)")
    group.add_argument("--dataset", help="a `datasets` dataset instead of files (needs `pip install datasets`), "
                                         "e.g. `text` or `json` with --train-files as its data_files")
    group.add_argument("--dataset-config", help="configuration name of --dataset")
    group.add_argument("--dataset-split", default="train", help="split of --dataset (default: %(default)s)")
    group.add_argument("--text-column", default="text", help="column of --dataset holding text (default: %(default)s)")
    group.add_argument("--validation-fraction", type=float, default=DEFAULT_VALIDATION_FRACTION,
                       help="share of documents held out (default: %(default)s)")
    group.add_argument("--block-size", type=int, default=256, help="tokens per training example (default: %(default)s)")
    group.add_argument("--max-eval-blocks", type=int, default=64,
                       help="held-out blocks evaluated at the end; 0 skips (default: %(default)s)")
    group.add_argument("--streaming", action="store_true",
                       help="tokenize and pack on the fly (bounded memory) instead of up front")
    group.add_argument("--seed", type=int, default=DEFAULT_SEED,
                       help="data split and training seed (default: %(default)s)")


def documents_from_args(args: argparse.Namespace) -> tuple[Sequence[str], Sequence[str], str]:
    """Training and held-out documents from the `add_data_arguments` options.

    Returns:
        `(train, validation, description)`: re-iterable text sources (`TextFileCorpus` for files, lists for a
        `datasets` dataset) and a one-line description of the source. Training documents come in a seeded
        shuffled order, so that a streamed corpus is not read directory by directory.
    """
    if args.dataset is not None:
        documents = load_dataset_documents(args.dataset, args.dataset_config, args.dataset_split, args.text_column,
                                           data_files=args.train_files)
        description = f"dataset {args.dataset!r} split {args.dataset_split!r}"
    else:
        documents = resolve_files(args.train_files) if args.train_files else stdlib_files()
        description = " ".join(map(str, args.train_files)) if args.train_files else "the Python standard library"
    train, validation = split_documents(documents, args.validation_fraction, args.seed)
    random.Random(args.seed).shuffle(train)
    if args.dataset is None:
        train, validation = TextFileCorpus(train), TextFileCorpus(validation)
    return train, validation, description


def block_datasets_from_args(
    args: argparse.Namespace, train_documents, validation_documents, tokenizer: PreTrainedTokenizerBase
) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset | None]:
    """`(train_dataset, eval_dataset)` of `--block-size` blocks: `StreamingBlockDataset`s with `--streaming`,
    else `PackedBlockDataset`s. The eval dataset holds at most `--max-eval-blocks` blocks and is None when that
    is 0 or nothing is held out."""
    eval_dataset = None
    if args.streaming:
        train_dataset = StreamingBlockDataset(train_documents, tokenizer, args.block_size)
        if args.max_eval_blocks > 0 and len(validation_documents) > 0:
            eval_dataset = StreamingBlockDataset(validation_documents, tokenizer, args.block_size, args.max_eval_blocks)
        return train_dataset, eval_dataset
    train_dataset = PackedBlockDataset(train_documents, tokenizer, args.block_size, progress=True)
    if len(train_dataset) == 0:
        raise ValueError(f"the training documents hold {train_dataset.dropped_tokens} tokens, fewer than one "
                         f"block (--block-size {args.block_size}); give more text or a smaller block size")
    if args.max_eval_blocks > 0 and len(validation_documents) > 0:
        eval_dataset = PackedBlockDataset(validation_documents, tokenizer, args.block_size, args.max_eval_blocks,
                                          progress=False)
        if len(eval_dataset) == 0:
            eval_dataset = None
    return train_dataset, eval_dataset
