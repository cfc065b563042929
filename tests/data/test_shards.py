import json
import struct

import numpy as np
import pytest
from conftest import tree_digest

from tinytrain.data import shards
from tinytrain.data.shards import ShardError


def _prepare(folder, vocab, docs, shard_tokens=10):
    """Token documents written as shards (train: all of them, val: the first) plus a manifest, by the
    writers the preparation pipeline uses."""
    dtype = shards.dtype_for_vocab(vocab)
    entries, documents = {}, {}
    for split, split_docs in {"train": docs, "val": docs[:1]}.items():
        writer = shards.ShardWriter(folder, split, dtype, shard_tokens)
        for ids in split_docs:
            writer.add_document(ids)
        entries[split] = writer.close()
        documents[split] = writer.documents
    return shards.write_manifest(folder, dtype, entries, {"file": "t.model", "sha256": "abc", "vocab_size": vocab},
                                 {"bos": True}, documents)


@pytest.mark.parametrize("vocab,dtype", [(512, np.uint16), (70000, np.uint32)])
def test_roundtrip_across_shard_boundaries(tmp_path, vocab, dtype):
    docs = [list(range(i, i + 7)) for i in range(0, 60, 7)] + [[vocab - 1]]
    _prepare(tmp_path, vocab, docs)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["dtype"] == np.dtype(dtype).name
    assert manifest["documents"] == {"train": len(docs), "val": 1}
    assert len(manifest["splits"]["train"]) > 3  # several shards of 10 tokens
    stream = shards.open_split(tmp_path, "train", vocab, verify="full")
    flat = np.concatenate([np.array(d) for d in docs])
    assert len(stream) == flat.size
    for start, stop in [(0, 5), (8, 23), (0, flat.size), (flat.size - 3, flat.size)]:
        np.testing.assert_array_equal(stream.slice(start, stop), flat[start:stop])


def test_no_padding_is_ever_written(tmp_path):
    docs = [[1, 5, 6], [1, 7], [1, 8, 9, 10, 11]]
    _prepare(tmp_path, 512, docs, shard_tokens=4)
    stream = shards.open_split(tmp_path, "train", 512)
    np.testing.assert_array_equal(stream.slice(0, len(stream)), [1, 5, 6, 1, 7, 1, 8, 9, 10, 11])


@pytest.fixture
def folder(tmp_path):
    _prepare(tmp_path / "data", 512, [list(range(100, 140))] * 3)
    return tmp_path / "data"


def _expect_error(folder, match, **kwargs):
    before = tree_digest(folder)
    with pytest.raises(ShardError, match=match):
        shards.open_split(folder, "train", **{"vocab_size": 512, **kwargs})
    assert tree_digest(folder) == before  # nothing was modified


def test_wrong_magic_names_the_file(folder):
    path = folder / "train-00001.bin"
    raw = bytearray(path.read_bytes())
    raw[:8] = b"GARBAGE!"
    path.write_bytes(bytes(raw))
    _expect_error(folder, r"train-00001\.bin: not a tinytrain shard")


def test_truncated_shard_names_the_file(folder):
    path = folder / "train-00002.bin"
    path.write_bytes(path.read_bytes()[:-3])
    _expect_error(folder, r"train-00002\.bin: truncated or padded shard: header says 10 tokens")


def test_header_shorter_than_32_bytes(folder):
    (folder / "train-00000.bin").write_bytes(b"TTSH")
    _expect_error(folder, r"train-00000\.bin: truncated shard: 4 bytes")


def test_unknown_format_version(folder):
    path = folder / "train-00000.bin"
    raw = bytearray(path.read_bytes())
    raw[8:12] = struct.pack("<I", 99)
    path.write_bytes(bytes(raw))
    _expect_error(folder, r"train-00000\.bin: shard format version 99")


def test_token_id_beyond_the_model_vocab(folder):
    _expect_error(folder, r"train-00000\.bin: holds token id 109, but the model's vocab_size is 100", vocab_size=100)


def test_altered_contents_fail_full_verification(folder):
    path = folder / "train-00003.bin"
    raw = bytearray(path.read_bytes())
    raw[-2:] = struct.pack("<H", 60000)  # same size, different token
    path.write_bytes(bytes(raw))
    shards.open_split(folder, "train", 512, verify="header")  # the cheap check cannot see it
    _expect_error(folder, r"train-00003\.bin: sha256 .* the file was altered", verify="full")


def test_tokenizer_mismatch(folder):
    _expect_error(folder, r"manifest\.json: shards were made with tokenizer sha256 abc .* has sha256 def",
                  tokenizer_sha256="def")


def test_missing_manifest_or_file(folder, tmp_path):
    with pytest.raises(ShardError, match=r"manifest\.json: missing"):
        shards.open_split(tmp_path, "train")
    with pytest.raises(ShardError, match=r"nope: prepared data folder does not exist"):
        shards.open_split(tmp_path / "nope", "train")
    (folder / "train-00001.bin").unlink()
    with pytest.raises(ShardError, match=r"train-00001\.bin: listed in .* but missing"):
        shards.open_split(folder, "train")


def test_prepared_folders_appear_whole_and_are_never_replaced(tmp_path):
    from tinytrain.store.fsutil import atomic_folder

    first = tmp_path / "a"
    with atomic_folder(first) as tmp:
        _prepare(tmp, 512, [[1, 2, 3]])
    before = tree_digest(first)
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_folder(first) as tmp:
            pass
    with pytest.raises(ShardError):
        with atomic_folder(tmp_path / "b") as tmp:
            _prepare(tmp, 512, [[1, 2, 3]])
            raise ShardError("interrupted")
    assert tree_digest(first) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # nothing half-written is left
