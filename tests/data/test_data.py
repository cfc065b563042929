import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tinytrain.data import shards
from tinytrain.data.corpus import CorpusError, list_corpus_files, prepare_text_folder
from tinytrain.data.datamodule import TokenData
from tinytrain.data.order import Blocks, Mixture, SampleOrder, TrainSteps, grad_accumulation, permute, sample_blocks
from tinytrain.data.tokenizer import Tokenizer


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
    from tinytrain.data.tokenizer import train_tokenizer

    other = train_tokenizer([f"line {i} of another corpus" for i in range(2000)], tmp_path / "other.model", 300)
    dm = TokenData(path=str(prepared), tokenizer=str(other.path), vocab_size=512, seq_len=16,
                   global_batch_size=8, micro_batch_size=2)
    with pytest.raises(shards.ShardError, match="shards were made with tokenizer sha256"):
        dm.open()
    ok = TokenData(path=str(prepared), tokenizer=str(prepared / "tokenizer.model"), vocab_size=512, seq_len=16,
                   global_batch_size=8, micro_batch_size=2)
    ok.open()
    assert len(ok.train_blocks) > 0


# --- mixtures -------------------------------------------------------------------------------------


def test_mixture_quotas_are_the_weights_to_six_digits():
    mix = Mixture([0.693584, 0.306416])  # TinyLlama's SlimPajama / StarCoder weights
    assert mix.quotas.tolist() == [693_584, 306_416]
    source, _ = mix.locate(np.arange(3 * mix.period))
    assert np.bincount(source).tolist() == [3 * 693_584, 3 * 306_416]


@pytest.mark.parametrize("start", [0, 123_456, 999_000, 10**12 + 17])
def test_every_window_of_a_mixture_holds_each_source_by_weight(start):
    mix = Mixture([0.5, 0.3, 0.2])
    source, _ = mix.locate(np.arange(start, start + 1024))
    counts = np.bincount(source, minlength=3)
    assert np.all(np.abs(counts - np.array([0.5, 0.3, 0.2]) * 1024) <= 2), counts  # every global batch is mixed


def test_each_source_numbers_its_samples_consecutively():
    mix = Mixture([3, 1, 1], period=50)
    source, index = mix.locate(np.arange(1234))
    for s in range(3):
        assert index[source == s].tolist() == list(range(int((source == s).sum())))
    assert mix.drawn(1234).tolist() == np.bincount(source).tolist()
    far = 10**12 + 5
    s_far, i_far = mix.locate(np.array([far]))
    assert i_far[0] == mix.drawn(far)[s_far[0]]  # O(1) arithmetic agrees with counting, far out


def test_bad_weights_are_refused():
    for weights in ([1.0, 0.0], [1.0, -2.0], [float("nan")], []):
        with pytest.raises(ValueError, match="mixture weights must be positive"):
            Mixture(weights)
    with pytest.raises(ValueError, match="below 1/1000000"):
        Mixture([1.0, 1e-9])


def test_one_source_keeps_the_plain_order(blocks):
    order = SampleOrder([blocks], seed=7)
    source, block = order.locate(np.arange(3 * len(blocks)))
    assert not source.any()
    np.testing.assert_array_equal(block, sample_blocks(np.arange(3 * len(blocks)), len(blocks), 7))


@pytest.fixture(scope="module")
def two_sources(prepared):
    big = Blocks(shards.open_split(prepared, "train", 512), seq_len=16)
    small = Blocks(shards.open_split(prepared, "val", 512), seq_len=16)  # far fewer blocks: runs out first
    return SampleOrder([big, small], seed=7, weights=[0.7, 0.3])


def test_a_source_that_runs_out_reshuffles_on_its_own(two_sources):
    big, small = two_sources.blocks
    n = len(small)
    samples = np.arange(int(4 * n / 0.3) + 10)
    source, block = two_sources.locate(samples)
    seq = block[source == 1]
    epochs = [seq[e * n:(e + 1) * n] for e in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))  # every block of the small source once per its epoch
    assert not np.array_equal(epochs[0], epochs[1])  # and a new order each time
    big_seq = block[source == 0]
    assert len(big_seq) < len(big) and len(set(big_seq.tolist())) == len(big_seq)  # the big one is still in epoch 0
    small_epochs = two_sources.epochs(len(samples))
    assert small_epochs[1] == pytest.approx(len(seq) / n) and small_epochs[1] > 3 and small_epochs[0] < 1


@pytest.mark.parametrize("world", [1, 2, 4])
def test_mixture_resume_and_world_size(two_sources, world):
    def steps(start, stop, rank):
        return list(TrainSteps(two_sources, global_batch=8, micro_batch=2, rank=rank, world_size=world,
                               start_step=start, stop_step=stop))

    whole = [b.reshape(-1, 17) for b in TrainSteps(two_sources, 8, 2, 0, 1, 0, 12)]
    for rank in range(world):
        resumed = steps(9, 12, rank)
        for k, step in enumerate(range(9, 12)):
            per = 8 // world
            assert torch.equal(resumed[k].reshape(-1, 17), whole[step][rank * per:(rank + 1) * per])
    far = TrainSteps(two_sources, 8, 2, 0, world, 10**9, None).step_batch(10**9)
    assert far.shape == (8 // (2 * world), 2, 17) and int(far.max()) < 512


def test_altered_token_stops_the_loader_naming_the_file(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    entry = shards.read_manifest(copy)["splits"]["train"][0]
    victim = copy / entry["file"]
    data = bytearray(victim.read_bytes())
    data[shards.HEADER.size:] = b"\xff" * (len(data) - shards.HEADER.size)  # every id 65535, same size
    victim.write_bytes(bytes(data))
    dm = TokenData(path=str(copy), vocab_size=512, seq_len=16, global_batch_size=8, micro_batch_size=2)
    dm.open()  # the header check passes: same size, same count
    with pytest.raises(shards.ShardError, match=f"{victim}: holds token id 65535 >= the model's vocab_size 512"):
        for _ in dm.train_dataset(0, 200):
            pass
    full = TokenData(path=str(copy), vocab_size=512, seq_len=16, global_batch_size=8, micro_batch_size=2,
                     verify="full")
    with pytest.raises(shards.ShardError, match=f"{victim}: sha256 .* the file was altered"):
        full.open()


def test_sources_must_share_a_tokenizer(prepared, code_corpus, tmp_path):
    other = prepare_text_folder(code_corpus, tmp_path / "other", 400, val_fraction=0.1)
    dm = TokenData(sources=[{"path": str(prepared)}, {"path": str(other)}], vocab_size=512, seq_len=16,
                   global_batch_size=8, micro_batch_size=2)
    with pytest.raises(shards.ShardError, match=f"{other / 'manifest.json'}: shards were made with tokenizer"):
        dm.open()
    with pytest.raises(ValueError, match="repeated names"):
        TokenData(sources=[{"path": "a/x"}, {"path": "b/x"}])
    with pytest.raises(ValueError, match=r"data.sources\[1\].weight must be a positive number"):
        TokenData(sources=[{"path": "a"}, {"path": "b", "weight": 0}])
