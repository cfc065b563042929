import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tinytrain import shards
from tinytrain.corpus import CorpusError, list_corpus_files, prepare_text_folder
from tinytrain.data import Blocks, SampleOrder, TokenData, TrainSteps, grad_accumulation, permute, sample_blocks
from tinytrain.tokenizer import Tokenizer


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097, 65537])
def test_permutation_is_a_bijection(n):
    out = permute(np.arange(n), n, seed=3407, epoch=2)
    assert sorted(out.tolist()) == list(range(n))


def test_permutation_depends_on_seed_and_epoch():
    n = 1000
    base = permute(np.arange(n), n, 1, 0)
    assert not np.array_equal(base, permute(np.arange(n), n, 1, 1))
    assert not np.array_equal(base, permute(np.arange(n), n, 2, 0))
    np.testing.assert_array_equal(base, permute(np.arange(n), n, 1, 0))
    assert abs(np.corrcoef(np.arange(n), base)[0, 1]) < 0.1  # no visible order left


def test_every_block_once_per_epoch():
    n = 37
    blocks = sample_blocks(np.arange(3 * n), n, seed=5)
    for epoch in range(3):
        assert sorted(blocks[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(blocks[:n], blocks[n:2 * n])  # reshuffled each epoch


@pytest.fixture(scope="module")
def blocks(prepared):
    return Blocks(shards.open_split(prepared, "train", 512), seq_len=16)


def _steps(blocks, world, rank, start=0, stop=6, micro=2):
    return TrainSteps(SampleOrder([blocks], seed=7), global_batch=8, micro_batch=micro, rank=rank,
                      world_size=world, start_step=start, stop_step=stop)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_partition_each_global_batch_and_match_one_process(blocks, world):
    single = [b.reshape(-1, 17) for b in _steps(blocks, 1, 0)]
    per_rank = [[b.reshape(-1, 17) for b in _steps(blocks, world, r)] for r in range(world)]
    for step, whole in enumerate(single):
        union = torch.cat([per_rank[r][step] for r in range(world)])
        assert torch.equal(union, whole)  # every sample read by exactly one rank, same order


def test_accumulation_shape(blocks):
    batch = next(iter(_steps(blocks, 2, 1, micro=2)))
    assert batch.shape == (2, 2, 17)  # 8 sequences / (2 ranks x micro 2) = 2 micro-batches


def test_position_is_a_function_of_the_step(blocks):
    from_zero = list(_steps(blocks, 1, 0, start=0, stop=10))
    resumed = list(_steps(blocks, 1, 0, start=6, stop=10))
    assert all(torch.equal(a, b) for a, b in zip(from_zero[6:], resumed))


def test_blocks_overlap_by_one_token_so_every_token_is_a_target(blocks):
    a, b = blocks.gather(np.array([3, 4]))
    assert a[-1] == b[0]


def test_worker_processes_keep_the_order(blocks):
    plain = list(_steps(blocks, 1, 0, stop=8))
    loader = DataLoader(_steps(blocks, 1, 0, stop=8), batch_size=None, num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(plain, loader, strict=True))


def test_global_batch_must_divide():
    assert grad_accumulation(1024, 8, 4) == 32
    with pytest.raises(ValueError, match=r"global_batch_size=1000 is not divisible by data.micro_batch_size=8 x world size 4"):
        grad_accumulation(1000, 8, 4)


def test_missing_and_empty_corpus_folders(tmp_path):
    with pytest.raises(CorpusError, match=f"corpus folder {tmp_path / 'absent'} does not exist"):
        list_corpus_files(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=f"corpus folder {tmp_path / 'empty'} holds no text files"):
        list_corpus_files(tmp_path / "empty")
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CorpusError, match="none of its 1 files holds readable UTF-8 text"):
        prepare_text_folder(tmp_path / "binary", tmp_path / "out", 300)
    assert not (tmp_path / "out").exists()


def test_prepared_folder_records_the_tokenizer_and_bos_convention(prepared):
    import json

    manifest = json.loads((prepared / "manifest.json").read_text())
    tok = Tokenizer(prepared / "tokenizer.model")
    assert manifest["tokenizer"]["sha256"] == tok.sha256
    assert manifest["settings"]["bos"] is True and manifest["settings"]["eos"] is False
    assert (tok.processor.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2)
    first = shards.open_split(prepared, "train").slice(0, 20)
    assert first[0] == tok.bos_id
    text = "def f(x):\n    return  x + 1\n"
    assert tok.decode(tok.encode(text)) == text  # whitespace and newlines survive


def test_datamodule_checks_tokenizer(prepared, tmp_path):
    from tinytrain.tokenizer import train_tokenizer

    other = train_tokenizer([f"line {i} of another corpus" for i in range(2000)], tmp_path / "other.model", 300)
    dm = TokenData(path=str(prepared), tokenizer=str(other.path), vocab_size=512, seq_len=16,
                   global_batch_size=8, micro_batch_size=2)
    with pytest.raises(shards.ShardError, match="shards were made with tokenizer sha256"):
        dm.open()
    ok = TokenData(path=str(prepared), tokenizer=str(prepared / "tokenizer.model"), vocab_size=512, seq_len=16,
                   global_batch_size=8, micro_batch_size=2)
    ok.open()
    assert len(ok.train_blocks) > 0
