"""Practices beyond TinyLlama's recipe: document masking, warmup-stable-decay schedules and their
cooldown branches, weight averaging and loss-spike recovery."""

import math

import pytest
import torch
import torch.nn.functional as F

from tinytrain.errors import ConfigError
from tinytrain.model.llama import Llama, LlamaConfig
from tinytrain.train import parallel
from tinytrain.train.optim import OptimConfig

BOS = 1


# --- document masking ---------------------------------------------------------------------------

def documents(seed: int = 0):
    """Three documents, each starting with BOS, and a tail of a fourth (a block that starts mid-document)."""
    g = torch.Generator().manual_seed(seed)
    body = lambda n: torch.randint(3, 512, (n,), generator=g)  # noqa: E731
    tail = body(5)
    docs = [torch.cat([torch.tensor([BOS]), body(n)]) for n in (9, 14, 6)]
    return [tail, *docs]


def masked(config, positions: bool = False, seed: int = 0, attention: str = "auto") -> Llama:
    torch.manual_seed(seed)
    model = Llama(config)
    parallel.prepare(model, parallel.Switches(attention=attention, document_masking=True,
                                              document_positions=positions), bos_id=BOS)
    return model


@pytest.mark.parametrize("positions", [False, True], ids=["positions-run-on", "positions-restart"])
def test_a_packed_block_with_masking_is_each_document_on_its_own(positions):
    """Logits, loss and gradients of the packed block equal those of the documents run one by one
    (RoPE scores depend on relative positions only, so the position offset of a later document does
    not matter, restarted or not)."""
    config = LlamaConfig.from_name("ci")
    model = masked(config, positions).double()  # float64: the comparison shows the math, not rounding
    docs = documents()
    packed = torch.cat(docs)[None]
    targets = torch.cat([packed[0, 1:], torch.tensor([7])])[None]

    model.zero_grad()
    logits = model(packed)
    F.cross_entropy(logits[0], targets[0], reduction="sum").backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    alone, start = [], 0
    for doc in docs:
        out = model(doc[None])
        alone.append(out[0])
        F.cross_entropy(out[0], targets[0, start:start + len(doc)], reduction="sum").backward()
        start += len(doc)
    # Restarted positions are the same arithmetic; run-on positions read other rows of RoPE's tables,
    # computed in fp32, so they agree to the tables' rounding.
    tol = dict(rtol=1e-9, atol=1e-9) if positions else dict(rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(logits[0], torch.cat(alone), **tol)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, **tol)
    # and the loss the trainer computes (in fp32) is the same mean
    sep = F.cross_entropy(torch.cat(alone), targets[0])
    torch.testing.assert_close(model(packed, targets).double(), sep, rtol=1e-6, atol=1e-6)


@torch.no_grad()  # FlexAttention has no backward on CPU: CUDA trains with it, here its forward is compared
def test_flexattention_block_mask_gives_the_dense_masks_logits():
    config = LlamaConfig.from_name("ci")
    packed = torch.stack([torch.cat(documents(0)), torch.cat(documents(1))])
    dense, flex = masked(config, attention="sdpa").eval(), masked(config, attention="flex").eval()
    assert flex.layers[0].self_attn.kernel.documents(packed.eq(BOS).cumsum(1)).block_mask is not None
    torch.testing.assert_close(flex(packed), dense(packed), rtol=1e-5, atol=1e-5)


def test_flash_varlen_offsets_are_built_once_per_forward_not_per_layer(monkeypatch):
    """With flash-attn (mocked: CPU), the document offsets cost one host sync per forward whatever
    the depth, activation checkpointing's recompute included: none in the layers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tinytrain.model import attention

    syncs = {"n": 0}
    reads = {torch.ops.aten.nonzero.default, torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}

    class CountSyncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            syncs["n"] += func in reads
            return func(*args, **(kwargs or {}))

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        assert isinstance(max_q, int) and cu_q.dtype == torch.int32
        return q * 1.0

    monkeypatch.setattr(attention.Kernel, "_use_flash", lambda self, q: True)
    monkeypatch.setattr(attention, "_flash_varlen_func", lambda: fake_varlen)
    monkeypatch.setattr(attention.Kernel, "documents",
                        lambda self, ids: attention.Documents(ids, cu_seqlens=attention.document_offsets(ids)))
    counts = []
    for layers in (2, 4):
        config = LlamaConfig.from_name("ci")
        config.num_hidden_layers = layers
        model = Llama(config)
        parallel.prepare(model, parallel.Switches(document_masking=True, activation_checkpointing=True), bos_id=BOS)
        packed = torch.cat(documents())[None]
        syncs["n"] = 0
        with CountSyncs():
            model(packed, packed).backward()
        counts.append(syncs["n"])
    assert counts[0] == counts[1] == 1, counts
    cu = attention.document_offsets(torch.cat(documents())[None].eq(BOS).cumsum(1))
    assert cu.tolist() == [0, 5, 15, 30, 37]


def test_without_masking_a_document_sees_the_one_before():
    config = LlamaConfig.from_name("ci")
    plain, mask = masked(config), masked(config)
    plain.document_boundary = None
    packed = torch.cat(documents())[None]
    with torch.no_grad():
        differs = (plain(packed) - mask(packed)).abs().amax(dim=-1)[0]
    first = len(documents()[0])
    assert differs[:first].max() < 1e-5  # the first document (the tail) sees the same tokens either way
    assert differs[first:].min() > 1e-4  # every later token has lost what came before its document


def test_generation_with_a_kv_cache_is_unaffected():
    from tinytrain.model.sampling import generate

    config = LlamaConfig.from_name("ci")
    model = masked(config).eval()
    prompt = documents()[1][None]
    torch.manual_seed(1)
    with_mask = generate(model, prompt, max_new_tokens=12, temperature=0.0)
    model.document_boundary = None
    torch.manual_seed(1)
    without = generate(model, prompt, max_new_tokens=12, temperature=0.0)
    assert torch.equal(with_mask, without)


def test_document_positions_need_masking():
    with pytest.raises(ConfigError, match="document_positions .* needs model.document_masking"):
        parallel.Switches(document_positions=True)


# --- schedules ----------------------------------------------------------------------------------

def test_cosine_is_tinyllamas_schedule_unchanged():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    assert o.lr_at(5) == 0.5 and o.lr_at(10) == 1.0
    assert o.lr_at(60) == pytest.approx(0.55) and o.lr_at(110) == pytest.approx(0.1) and o.lr_at(500) == 0.1


@pytest.mark.parametrize("shape, at_quarter", [("linear", 0.75), ("1-sqrt", 0.5), ("cosine", 0.5 * (1 + math.cos(math.pi / 4)))])
def test_wsd_holds_the_peak_then_cools_down_in_its_shape(shape, at_quarter):
    o = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=10, decay_steps=110, schedule="wsd", cooldown_steps=20,
                    cooldown_shape=shape)
    assert o.lr_at(5) == 0.5
    assert all(o.lr_at(s) == 1.0 for s in range(10, 91))  # stable until the cooldown's first step
    assert o.lr_at(95) == pytest.approx(at_quarter)
    assert o.lr_at(110) == 0.0 and o.lr_at(200) == 0.0
    assert [o.lr_at(s) for s in range(90, 111)] == sorted((o.lr_at(s) for s in range(90, 111)), reverse=True)


def test_wsd_cooldown_as_a_fraction_and_constant():
    o = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=1000, schedule="wsd", cooldown_fraction=0.2,
                    cooldown_shape="linear")
    assert o.cooldown_length == 200 and o.lr_at(800) == 1.0 and o.lr_at(900) == pytest.approx(0.5)
    c = OptimConfig(lr=1.0, warmup_steps=10, decay_steps=20, schedule="constant")
    assert c.lr_at(5) == 0.5 and c.lr_at(10) == c.lr_at(10_000) == 1.0


@pytest.mark.parametrize("field, value, message", [
    ("schedule", "step", "model.optim.schedule must be one of cosine, wsd, constant, got 'step'"),
    ("cooldown_shape", "sqrt", "model.optim.cooldown_shape must be one of linear, 1-sqrt, cosine, got 'sqrt'"),
    ("cooldown_fraction", 0.0, "model.optim.cooldown_fraction must be in (0, 1], got 0.0"),
    ("cooldown_steps", 1000, "model.optim.cooldown_steps must be in [1, decay_steps - warmup_steps = 90], got 1000"),
])
def test_schedule_settings_out_of_range_are_refused(field, value, message):
    with pytest.raises(ConfigError) as info:
        OptimConfig(warmup_steps=10, decay_steps=100, **{field: value})
    assert message in str(info.value)


# --- cooldown branches --------------------------------------------------------------------------

WSD = ["--model.optim.schedule", "wsd", "--model.optim.decay_steps", "1000", "--model.optim.cooldown_steps", "200",
       "--trainer.log_every_n_steps", "1"]


def run_folder(name: str) -> list[str]:
    return ["--trainer.default_root_dir", f"runs/{name}", "--trainer.logger.init_args.save_dir", f"runs/{name}"]


@pytest.fixture(scope="module")
def stable_run(tmp_path_factory, code_corpus):
    """40 steps of the stable phase of a WSD run (checkpoints at 20 and 40)."""
    from conftest import ci_args, tinytrain_in_process

    cwd = tmp_path_factory.mktemp("wsd")
    tinytrain_in_process(*ci_args(code_corpus, *WSD, *run_folder("main")), cwd=cwd, check=True)
    return cwd


def test_a_cooldown_branch_continues_the_run_with_only_the_learning_rate_changed(stable_run, code_corpus):
    """A branch from step 20 with the main run's own schedule retraces it exactly; one that cools
    down over steps 20..40 takes the same first step (same weights, optimizer state and data) and
    then differs only through its learning rate; the main run is left as it was."""
    from conftest import ci_args, metric_rows, series, tinytrain_in_process, tree_digest

    cwd = stable_run
    main = cwd / "runs" / "main"
    before = tree_digest(main / "checkpoints")
    start = main / "checkpoints" / "step-00000020"
    tinytrain_in_process(*ci_args(code_corpus, *WSD, *run_folder("same"), "--checkpoint.branch_from", start), cwd=cwd,
                         check=True)
    proc = tinytrain_in_process(*ci_args(code_corpus, *WSD, *run_folder("cool"), "--checkpoint.branch_from", start,
                                         "--model.optim.decay_steps", "40", "--model.optim.cooldown_steps", "20",
                                         "--model.optim.cooldown_shape", "linear", "--model.optim.min_lr", "0"),
                                cwd=cwd, check=True)
    assert f"branching from {start.resolve()}" in proc.stderr
    assert tree_digest(main / "checkpoints") == before

    main_rows, same_rows, cool_rows = (metric_rows(cwd / "runs" / n) for n in ("main", "same", "cool"))
    main_loss = dict(series(main_rows, "train/loss"))
    same_loss, cool_loss = dict(series(same_rows, "train/loss")), dict(series(cool_rows, "train/loss"))
    assert sorted(same_loss) == sorted(cool_loss) == list(range(20, 40))  # steps 21..40, logged at index 20..39
    for step in same_loss:
        assert same_loss[step] == pytest.approx(main_loss[step], rel=1e-6, abs=1e-6)
    assert cool_loss[20] == pytest.approx(main_loss[20], rel=1e-6, abs=1e-6)
    assert any(abs(cool_loss[s] - main_loss[s]) > 1e-4 for s in range(22, 40))

    lr = dict(series(cool_rows, "train/lr"))
    assert lr[20] == pytest.approx(3e-3) and lr[30] == pytest.approx(3e-3 * 10 / 20) and lr[39] == pytest.approx(3e-3 / 20)
    assert all(v == pytest.approx(3e-3) for s, v in series(main_rows, "train/lr") if s >= 5)

    meta = (cwd / "runs" / "cool" / "checkpoints" / "step-00000040" / "meta.json").read_text()
    assert f'"branched_from": "{start.resolve()}"' in meta and '"tokens": 40960' in meta
    # once the branch has its own checkpoint, a re-run resumes from it, not from the other run
    again = tinytrain_in_process(*ci_args(code_corpus, *WSD, *run_folder("cool"), "--checkpoint.branch_from", start,
                                          "--model.optim.decay_steps", "40", "--model.optim.cooldown_steps", "20",
                                          "--model.optim.cooldown_shape", "linear", "--model.optim.min_lr", "0"),
                                 cwd=cwd, check=True)
    assert "resuming from" in again.stderr and "branching" not in again.stderr


def test_a_branch_into_its_own_run_folder_is_refused(stable_run, code_corpus):
    from conftest import ci_args, tinytrain_in_process

    cwd = stable_run
    proc = tinytrain_in_process(*ci_args(code_corpus, *WSD, *run_folder("main"), "--checkpoint.branch_from",
                                  "runs/main/checkpoints/step-00000020"), cwd=cwd)
    assert proc.returncode == 1
    assert "is in this run's own checkpoint folder" in proc.stderr.strip().splitlines()[-1]


# --- weight averaging ---------------------------------------------------------------------------

def test_the_moving_average_follows_its_formula():
    from tinytrain.train.ema import WeightAverage

    model = torch.nn.Linear(3, 2)
    ema = WeightAverage(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=0)  # decay ramps: min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.get_buffer("weight"), 0.1 * start + 0.9 * (start + 1))
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(80) == pytest.approx(81 / 90)
    assert ema.decay_at(10_000) == 0.9


def ema_fit(code_corpus, cwd, name: str, *extra):
    from conftest import ci_args, run_tinytrain

    return run_tinytrain(*ci_args(code_corpus, "--model.ema_decay", "0.9", *run_folder(name), *extra), cwd=cwd)


def resumed_copy(cwd, name: str, copy: str):
    """The run folder with its last checkpoint removed, to be resumed from the one before."""
    import shutil

    from tinytrain.store.checkpoint import point_last

    shutil.copytree(cwd / "runs" / name, cwd / "runs" / copy, symlinks=True)
    folder = cwd / "runs" / copy / "checkpoints"
    shutil.rmtree(folder / "step-00000040")
    point_last(folder, folder / "step-00000020")


@pytest.mark.parametrize("strategy", ["single", "fsdp2"])
def test_the_moving_average_is_saved_resumed_exactly_and_exported(strategy, code_corpus, tmp_path):
    from conftest import tinytrain_in_process

    from tinytrain.store.checkpoint import load_model_weights

    extra = ["--trainer.strategy", "fsdp2", "--trainer.devices", "2"] if strategy == "fsdp2" else []
    ema_fit(code_corpus, tmp_path, "straight", *extra)
    resumed_copy(tmp_path, "straight", "resumed")
    proc = ema_fit(code_corpus, tmp_path, "resumed", *extra)
    assert "resuming from" in proc.stderr

    step = "checkpoints/step-00000040"
    straight, resumed = (tmp_path / "runs" / n / step for n in ("straight", "resumed"))
    if strategy == "fsdp2":  # sharded like the parameters: every rank wrote its part
        import torch.distributed.checkpoint as dcp

        keys = dcp.FileSystemReader(str(straight / "state.ckpt")).read_metadata().state_dict_metadata
        assert "state_dict.ema.layers/0/self_attn/q_proj/weight" in keys
    weights, average = load_model_weights(straight), load_model_weights(straight, average=True)
    again = load_model_weights(resumed, average=True)
    assert sorted(average) == sorted(k for k in weights if k != "lm_head.weight" or k in average)
    for k in average:
        torch.testing.assert_close(again[k], average[k], rtol=0, atol=1e-6)
    assert max((average[k] - weights[k]).abs().max().item() for k in average) > 1e-3  # it is not the weights

    out = tmp_path / "ema"
    tinytrain_in_process("average", "--ema", straight, out, cwd=tmp_path, check=True)
    exported = load_model_weights(out)
    assert all(torch.equal(exported[k], average[k]) for k in average)
    assert '"format": "ema"' in (out / "meta.json").read_text()
    gen = tinytrain_in_process("generate", out, "--prompt", "def ", "--max_new_tokens", "5", cwd=tmp_path, check=True)
    assert gen.stdout.startswith("def ")


def test_average_of_checkpoints(stable_run, tmp_path):
    """Uniform and exponential averages of sharded-or-not checkpoints, as generate and convert read them."""
    from conftest import tinytrain_in_process

    from tinytrain.store.checkpoint import load_model_weights

    ckpts = stable_run / "runs" / "main" / "checkpoints"
    old, new = ckpts / "step-00000020", ckpts / "step-00000040"
    w_old, w_new = load_model_weights(old), load_model_weights(new)
    # any order: sorted by step
    tinytrain_in_process("average", new, old, tmp_path / "uniform", cwd=tmp_path, check=True)
    tinytrain_in_process("average", old, new, tmp_path / "exp", "--mode", "exponential", "--decay", "0.5", cwd=tmp_path,
                         check=True)
    uniform, exp = load_model_weights(tmp_path / "uniform"), load_model_weights(tmp_path / "exp")
    for k in w_new:
        torch.testing.assert_close(uniform[k], (w_old[k] + w_new[k]) / 2)
        torch.testing.assert_close(exp[k], w_old[k] / 3 + 2 * w_new[k] / 3)
    meta = (tmp_path / "exp" / "meta.json").read_text()
    assert '"step": 40' in meta and '"weight": 0.333333' in meta and '"weight": 0.666667' in meta
    tinytrain_in_process("generate", tmp_path / "uniform", "--prompt", "def ", "--max_new_tokens", "5", cwd=tmp_path,
                         check=True)
    tinytrain_in_process("convert", "to-hf", tmp_path / "uniform", tmp_path / "uniform-hf", cwd=tmp_path, check=True)
    assert (tmp_path / "uniform-hf" / "model.safetensors").is_file()

    for args, message in [((old, tmp_path / "one"), "give at least two checkpoints and an output folder"),
                          ((old, new, tmp_path / "uniform"), "already exists; choose a new folder"),
                          ((old, new, tmp_path / "x", "--mode", "exponential", "--decay", "1.5"),
                           "--decay must be in (0, 1), got 1.5"),
                          ((old, tmp_path / "missing", tmp_path / "y"), "missing")]:
        bad = tinytrain_in_process("average", *args, cwd=tmp_path, check=False)
        assert bad.returncode != 0 and message in bad.stderr.strip().splitlines()[-1], bad.stderr
        assert bad.stderr.strip().splitlines()[-1].startswith("tinytrain average: error: ")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- loss-spike recovery ------------------------------------------------------------------------

SPIKES = ["--model.spikes.enabled", "true", "--model.spikes.window", "10", "--model.spikes.min_history", "5",
          "--model.spikes.threshold", "4", "--model.spikes.rollback_after", "2", "--checkpoint.every_n_steps", "5",
          "--checkpoint.keep_last", "0", "--trainer.log_every_n_steps", "1"]


def poison(prepared, out, steps):
    """A copy of the prepared folder whose training blocks read at the given optimizer steps (0-based,
    the ci recipe's batch of 16 x 64) hold random token ids: their loss explodes."""
    import shutil

    import numpy as np

    from tinytrain.data import shards
    from tinytrain.data.datamodule import TokenData
    from tinytrain.data.order import rank_samples

    shutil.copytree(prepared, out)
    dm = TokenData(path=str(out), vocab_size=512, seq_len=64, global_batch_size=16, micro_batch_size=8, seed=3407)
    dm.open()
    stream = dm.order.blocks[0].stream
    rng = np.random.default_rng(0)
    for step in steps:
        _, blocks = dm.order.locate(rank_samples(step, 16, 0, 1))
        for b in blocks:
            for pos in range(int(b) * 64 + 1, int(b) * 64 + 64):  # the block's own tokens, not its neighbours'
                i = int(np.searchsorted(stream.starts, pos, side="right")) - 1
                dtype, count = shards.read_header(stream.files[i])
                tokens = np.memmap(stream.files[i], dtype=dtype, mode="r+", offset=shards.HEADER.size, shape=(count,))
                tokens[pos - stream.starts[i]] = rng.integers(3, 512)
                tokens.flush()
    return out


@pytest.fixture(scope="module")
def spiky_run(tmp_path_factory, prepared):
    from conftest import RECIPES, run_tinytrain

    cwd = tmp_path_factory.mktemp("spikes")
    data = poison(prepared, cwd / "poisoned", steps=[31, 32])
    args = ["fit", "--config", RECIPES / "ci.yaml", "--data.path", data, *SPIKES]
    proc = run_tinytrain(*args, cwd=cwd)
    return cwd, args, proc


def test_spikes_are_skipped_then_rolled_back_past_their_data(spiky_run):
    import json

    from conftest import metric_rows, series

    cwd, _, proc = spiky_run
    run = cwd / "runs" / "ci"
    assert "step 32: loss spike" in proc.stderr and "step 33: loss spike" in proc.stderr
    assert "rolling back to" in proc.stderr and "skipping the data of steps 31 to 33" in proc.stderr
    rollbacks = json.loads((run / "checkpoints" / "rollbacks.json").read_text())
    assert len(rollbacks) == 1
    r = rollbacks[0]
    assert (r["spike_steps"], r["to_checkpoint_step"], r["skipped_data_of_steps"]) == ([32, 33], 30, [31, 33])
    assert (r["resume_at_sample"], r["skipped_samples"]) == (33 * 16, 3 * 16)

    rows = metric_rows(run)
    assert sorted(s for s, _ in series(rows, "train/spike_loss")) == [31, 32]
    assert min(v for _, v in series(rows, "train/spike_loss")) > 1.5 * max(
        v for s, v in series(rows, "train/loss") if 20 <= s < 31)
    meta = json.loads((run / "checkpoints" / "step-00000040" / "meta.json").read_text())
    assert meta["spikes"] == {"skipped_steps": [], "rollbacks": rollbacks}  # no spike after the rollback
    assert meta["tokens"] == 40 * 16 * 64  # the skipped samples are not counted as trained
    assert math.isfinite(dict(series(rows, "val/loss"))[39])


def test_a_resume_after_a_rollback_is_exact(spiky_run, tmp_path):
    """From the checkpoint written after the rollback (its state holds the skip) and from the one it
    went back to (the rollback is applied again), the run ends at the same weights."""
    import shutil

    from conftest import run_tinytrain

    from tinytrain.store.checkpoint import load_model_weights, point_last

    cwd, args, _ = spiky_run
    reference = load_model_weights(cwd / "runs" / "ci" / "checkpoints" / "step-00000040")
    for resume_from in ("step-00000035", "step-00000030"):
        copy = tmp_path / resume_from
        shutil.copytree(cwd / "runs", copy / "runs", symlinks=True)
        folder = copy / "runs" / "ci" / "checkpoints"
        for later in folder.glob("step-*"):
            if later.name > resume_from:
                shutil.rmtree(later)
        point_last(folder, folder / resume_from)
        proc = run_tinytrain(*args, cwd=copy)
        assert "loss spike" not in proc.stderr
        again = load_model_weights(folder / "step-00000040")
        for k in reference:
            assert torch.equal(again[k], reference[k]), (resume_from, k)


def test_spike_settings_out_of_range_are_refused():
    from tinytrain.train.spikes import SpikeConfig

    with pytest.raises(ConfigError, match=r"model.spikes.min_history must be in \[2, window=10\], got 20"):
        SpikeConfig(window=10, min_history=20)


def test_every_switch_on_resumes_exactly_on_another_world_size(code_corpus, tmp_path):
    """Document masking, WSD, the moving average and spike recovery together under FSDP2 on 2
    processes; resumed on 1 process from step 20, the run ends where the uninterrupted one did."""
    from conftest import ci_args, run_tinytrain

    from tinytrain.store.checkpoint import load_model_weights

    switches = ["--model.document_masking", "true", "--model.document_positions", "true", "--model.ema_decay", "0.9",
                "--model.spikes.enabled", "true", *WSD, "--trainer.strategy", "fsdp2"]
    run_tinytrain(*ci_args(code_corpus, *switches, *run_folder("straight"), "--trainer.devices", "2"), cwd=tmp_path)
    resumed_copy(tmp_path, "straight", "elastic")
    proc = run_tinytrain(*ci_args(code_corpus, *switches, *run_folder("elastic"), "--trainer.devices", "1"),
                         cwd=tmp_path)
    assert "resuming from" in proc.stderr and "attention backend: sdpa with a document mask" in proc.stderr
    step = "checkpoints/step-00000040"
    for average in (False, True):
        a = load_model_weights(tmp_path / "runs" / "straight" / step, average=average)
        b = load_model_weights(tmp_path / "runs" / "elastic" / step, average=average)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
