"""The data pipeline: file resolution, held-out split, BPE tokenizer, packing, map-style and streaming datasets."""

import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from modeling_deepseek_v3.data import (
    SPECIAL_TOKENS,
    PackedBlockDataset,
    StreamingBlockDataset,
    TextFileCorpus,
    load_dataset_documents,
    pack_token_ids,
    read_document,
    resolve_files,
    split_documents,
    stdlib_files,
    train_bpe_tokenizer,
)

EOS = -1  # an id no document uses, so separators are unambiguous


def documents_of_lengths(*lengths):
    """Documents whose ids are (document index, position) pairs encoded as integers, so every id is unique."""
    return [[1000 * d + i for i in range(n)] for d, n in enumerate(lengths)]


def expected_stream(documents):
    stream = []
    for ids in documents:
        if ids:
            if stream:
                stream.append(EOS)
            stream.extend(ids)
    return stream


@pytest.mark.parametrize("lengths", [(5, 3, 9, 1, 7), (8, 8), (4, 3), (20,), (1, 1, 1, 1, 1, 1, 1, 1, 1)])
def test_packing_keeps_every_token_once_in_order_with_eos_between_documents(lengths):
    documents = documents_of_lengths(*lengths)
    stream = expected_stream(documents)
    packed = pack_token_ids(documents, block_size=4, eos_token_id=EOS)

    kept = [token for block in packed.blocks for token in block]
    assert kept + stream[len(kept):] == stream
    assert len(kept) + packed.dropped_tokens == len(stream)  # EOS between documents, none after the last
    assert packed.dropped_tokens == len(stream) % 4


def test_packing_cuts_full_blocks_and_drops_only_the_final_remainder():
    documents = documents_of_lengths(5, 3, 9, 1, 7)  # 25 ids + 4 EOS = 29
    packed = pack_token_ids(documents, block_size=8, eos_token_id=EOS)

    assert [len(block) for block in packed.blocks] == [8, 8, 8]
    assert packed.dropped_tokens == 29 - 24
    assert packed.blocks[0] == [0, 1, 2, 3, 4, EOS, 1000, 1001]
    assert packed.blocks[1] == [1002, EOS, 2000, 2001, 2002, 2003, 2004, 2005]

    exact = pack_token_ids(documents_of_lengths(3, 4), block_size=4, eos_token_id=EOS)  # 3 + EOS + 4 = 8
    assert exact.blocks == [[0, 1, 2, EOS], [1000, 1001, 1002, 1003]] and exact.dropped_tokens == 0

    too_short = pack_token_ids(documents_of_lengths(2, 1), block_size=8, eos_token_id=EOS)
    assert too_short.blocks == [] and too_short.dropped_tokens == 4


def test_packing_skips_empty_documents_instead_of_doubling_eos():
    packed = pack_token_ids([[], [1, 2], [], [], [3, 4], [], [5]], block_size=3, eos_token_id=EOS)
    assert packed.blocks == [[1, 2, EOS], [3, 4, EOS]] and packed.dropped_tokens == 1


def test_packing_rejects_a_block_size_below_two():
    with pytest.raises(ValueError, match="block_size"):
        pack_token_ids([[1, 2, 3]], block_size=1, eos_token_id=EOS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Twelve small files of varied length (one empty, one with non-ASCII text) and a BPE trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    words = "expert router latent cache token block shared gate bias load balance query key value".split()
    for i in range(12):
        text = "\n".join(" ".join(words[(i + j + k) % len(words)] for k in range(3 + j % 5)) for j in range(4 * i))
        extra = "\nnaïve café — ∑ 🎉" if i == 5 else ""
        (root / f"doc{i:02d}.txt").write_text(text + extra, encoding="utf-8")
    files = resolve_files([root])
    tokenizer = train_bpe_tokenizer(TextFileCorpus(files), vocab_size=320, show_progress=False)
    return files, tokenizer


def test_streaming_dataset_yields_the_same_blocks_as_the_map_style_dataset(corpus):
    files, tokenizer = corpus
    in_memory = PackedBlockDataset(TextFileCorpus(files), tokenizer, block_size=16, progress=False)
    streamed = StreamingBlockDataset(TextFileCorpus(files), tokenizer, block_size=16)

    streamed_blocks = torch.stack([example["input_ids"] for example in streamed])
    assert len(in_memory) > 10
    assert torch.equal(streamed_blocks, in_memory.blocks)
    assert streamed.dropped_tokens == in_memory.dropped_tokens
    assert torch.equal(torch.stack([example["input_ids"] for example in streamed]), streamed_blocks)  # next epoch

    limited = StreamingBlockDataset(TextFileCorpus(files), tokenizer, block_size=16, max_blocks=5)
    assert torch.equal(torch.stack([example["input_ids"] for example in limited]), in_memory.blocks[:5])
    assert torch.equal(PackedBlockDataset(TextFileCorpus(files), tokenizer, 16, max_blocks=5, progress=False).blocks,
                       in_memory.blocks[:5])


def test_streaming_dataset_with_two_workers_yields_each_block_once(corpus):
    files, tokenizer = corpus
    in_memory = PackedBlockDataset(TextFileCorpus(files), tokenizer, block_size=16, progress=False)
    loader = DataLoader(StreamingBlockDataset(TextFileCorpus(files), tokenizer, block_size=16), batch_size=None,
                        num_workers=2)
    blocks = sorted(tuple(example["input_ids"].tolist()) for example in loader)
    assert blocks == sorted(tuple(block) for block in in_memory.blocks.tolist())


def test_blocks_match_the_tokenized_documents_joined_by_eos(corpus):
    files, tokenizer = corpus
    dataset = PackedBlockDataset(TextFileCorpus(files), tokenizer, block_size=16, progress=False)
    ids_per_document = [tokenizer(read_document(f), add_special_tokens=False)["input_ids"] for f in files]
    expected = pack_token_ids(ids_per_document, 16, tokenizer.eos_token_id)
    assert torch.equal(dataset.blocks, torch.tensor(expected.blocks))
    assert dataset.blocks.flatten().tolist().count(tokenizer.eos_token_id) >= 9  # empty doc00 has no separator


def test_examples_are_input_ids_labels_and_a_full_attention_mask(corpus):
    files, tokenizer = corpus
    example = PackedBlockDataset(TextFileCorpus(files), tokenizer, block_size=16, progress=False)[3]
    assert set(example) == {"input_ids", "labels", "attention_mask"}
    for tensor in example.values():
        assert tensor.shape == (16,) and tensor.dtype == torch.long
    assert torch.equal(example["labels"], example["input_ids"])  # the model shifts
    assert example["labels"].data_ptr() != example["input_ids"].data_ptr()
    assert bool((example["attention_mask"] == 1).all())


def test_trained_bpe_tokenizer_round_trips_text_and_reloads_with_auto_tokenizer(corpus, tmp_path):
    _, tokenizer = corpus
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "def route(x):\n\treturn  x.topk(8)  # naïve café — ∑ 🎉 unseen 字\r\n"
    for tok in (tokenizer, reloaded):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert reloaded(text, add_special_tokens=False).input_ids == tokenizer(text, add_special_tokens=False).input_ids
    assert [reloaded.bos_token, reloaded.eos_token, reloaded.pad_token] == list(SPECIAL_TOKENS.values())
    assert [reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id] == [0, 1, 2]
    assert 256 + 3 < len(reloaded) <= 320  # merges were learned, within the requested vocabulary
    assert reloaded("token block")["input_ids"] == reloaded("token block", add_special_tokens=False)["input_ids"]


def test_held_out_split_is_deterministic_disjoint_and_complete():
    documents = [f"doc{i}" for i in range(200)]
    train, validation = split_documents(documents, validation_fraction=0.1, seed=3)
    assert (train, validation) == split_documents(documents, validation_fraction=0.1, seed=3)
    assert len(validation) == 20 and not set(train) & set(validation)
    assert sorted(train + validation) == sorted(documents)
    assert train == [d for d in documents if d in set(train)]  # input order kept
    assert split_documents(documents, 0.1, seed=4)[1] != validation
    assert split_documents(["a", "b", "c"], 0.01, seed=0)[1] != []  # at least one held out
    assert split_documents(["a", "b"], 0.0)[1] == []


def test_resolve_files_expands_directories_and_globs_and_names_what_is_missing(tmp_path):
    (tmp_path / "sub" / "__pycache__").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.py").write_text("b")
    (tmp_path / "sub" / "data.bin").write_bytes(b"\x00")
    (tmp_path / "sub" / "__pycache__" / "c.py").write_text("c")
    assert resolve_files([tmp_path]) == [tmp_path / "a.txt", tmp_path / "sub" / "b.py"]
    assert resolve_files([str(tmp_path / "**" / "*.py"), tmp_path / "sub" / "b.py"]) == [
        tmp_path / "sub" / "__pycache__" / "c.py", tmp_path / "sub" / "b.py"]

    missing = tmp_path / "nowhere.txt"
    with pytest.raises(FileNotFoundError, match="nowhere.txt.*does not exist"):
        resolve_files([tmp_path / "a.txt", missing])
    with pytest.raises(FileNotFoundError, match=r"\*\.md.*matches no file"):
        resolve_files([str(tmp_path / "*.md")])


def test_non_utf8_file_error_names_the_file(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: expected UTF-8"):
        list(TextFileCorpus([bad]))


def test_default_corpus_is_the_standard_library_without_installed_packages_or_tests():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    assert len(files) > 100 and root / "argparse.py" in files
    directories = {part for f in files for part in f.relative_to(root).parts[:-1]}
    assert not directories & {"site-packages", "test", "tests", "__pycache__"}


def test_dataset_source_without_the_datasets_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail even where it is installed
    with pytest.raises(ImportError, match="pip install datasets"):
        load_dataset_documents("text", data_files=["notes.txt"])


def test_streaming_dataset_rejects_a_one_shot_iterator(corpus):
    _, tokenizer = corpus
    with pytest.raises(TypeError, match="re-iterable"):
        StreamingBlockDataset(iter(["some text"]), tokenizer, block_size=8)
