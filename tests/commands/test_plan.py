"""`tinytrain plan`: the memory estimate against peaks measured by running real steps on CPU."""

import socket

import pytest
import torch
from conftest import RECIPES, tinytrain_in_process

from tinytrain.commands.plan import GIB, LiveTensorMemory, Setup, estimate, fits, measure
from tinytrain.model.llama import LlamaConfig

CASES = [  # precision, fsdp, micro batch, accumulation, extra settings
    ("32-true", False, 8, 1, {}),
    ("32-true", False, 4, 2, {}),
    ("bf16-mixed", False, 8, 1, {}),
    ("bf16-mixed", True, 8, 1, {}),
    ("bf16-mixed", True, 4, 2, {}),
    ("bf16-mixed", True, 4, 2, {"gather_once_per_step": False}),
    ("32-true", False, 8, 1, {"activation_checkpointing": True}),
    ("bf16-mixed", True, 8, 2, {"loss_chunk_size": 256}),
]


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("preset", ["ci", "tiny"])
@pytest.mark.parametrize("precision,fsdp,micro,accum,extra", CASES)
def test_estimate_is_within_15_percent_of_the_measured_peak(process_group, preset, precision, fsdp, micro, accum,
                                                            extra):
    config = LlamaConfig.from_name(preset)
    setup = Setup(config, 64 if preset == "ci" else 256, micro, accum, 1, precision, fsdp, **extra)
    predicted, measured = estimate(setup).peak, measure(setup)
    print(f"{preset} {precision} fsdp={fsdp} {micro}x{accum} {extra}: estimated {predicted / 2**20:.2f} MiB, "
          f"measured {measured / 2**20:.2f} MiB")
    assert predicted == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize("precision,fsdp", [("32-true", False), ("bf16-mixed", True)])
def test_muons_state_and_step_are_estimated_too(process_group, precision, fsdp):
    """Muon keeps one momentum per hidden matrix (AdamW two moments for the rest) and, in its step,
    the gathered whole of one matrix and its Newton-Schulz iterates: with sequences this short the
    step is the peak, so this checks those parts."""
    config = LlamaConfig.from_name("tiny", vocab_size=512)
    setup = Setup(config, 8, 1, 1, 1, precision, fsdp, optimizer="muon")
    e = estimate(setup)
    assert e.phase == "optimizer step" and e.parts["Muon momentum"] > e.parts["AdamW state"]
    assert e.peak == pytest.approx(measure(setup), rel=0.15)


@pytest.mark.parametrize("precision,fsdp", [("32-true", False), ("bf16-mixed", False), ("bf16-mixed", True)])
def test_experts_are_counted_in_weights_and_activations(process_group, precision, fsdp):
    """Each token keeps k experts' MLP tensors, its routed copies and the router's; the weights and
    optimizer state count every expert."""
    config = LlamaConfig.from_name("tiny", num_local_experts=4, num_experts_per_tok=2)
    setup = Setup(config, 256, 8, 1, 1, precision, fsdp)
    dense = estimate(Setup(LlamaConfig.from_name("tiny"), 256, 8, 1, 1, precision, fsdp))
    e = estimate(setup)
    assert e.parts["master weights"] == 4 * config.num_params() and e.parts["activations"] > dense.parts["activations"]
    assert e.peak == pytest.approx(measure(setup), rel=0.15)


def _rank(rank: int, port: int, queue) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    setup = Setup(LlamaConfig.from_name("tiny"), 256, 4, 2, 2, "bf16-mixed", True)
    queue.put((rank, measure(setup, mesh=init_device_mesh("cpu", (2,)))))
    dist.destroy_process_group()


def test_sharded_over_two_processes(tmp_path):
    """Each rank holds half the weights and AdamW state, the whole model while a step accumulates."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    peaks = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    predicted = estimate(Setup(LlamaConfig.from_name("tiny"), 256, 4, 2, 2, "bf16-mixed", True)).peak
    for rank, measured in peaks.items():
        assert predicted == pytest.approx(measured, rel=0.15), rank


def test_tracker_follows_frees_and_resizes():
    with LiveTensorMemory() as mem:
        a = torch.empty(1000, dtype=torch.float32)
        b = a.view(10, 100)  # a view: no new memory
        assert mem.live == 4000
        a.untyped_storage().resize_(0)  # as FSDP2 frees a gathered parameter
        assert mem.live == 0
        a.untyped_storage().resize_(4000)
        del a, b
    assert mem.live == 0 and mem.peak == 4000


def test_the_1_1b_recipe_on_eight_gpus():
    config = LlamaConfig.from_name("tinyllama-1.1b")
    s = Setup(config, 2048, 8, 16, 8, "bf16-mixed", True)
    e = estimate(s)
    assert e.parts["master weights"] == pytest.approx(1_100_048_384 * 4 / 8)
    assert e.parts["AdamW state"] == 2 * e.parts["master weights"]
    assert e.parts["FSDP2 gathered parameters"] == 2 * 1_100_048_384  # the whole model, bf16, for the step
    with_ac = Setup(**{**s.__dict__, "activation_checkpointing": True})
    assert estimate(with_ac).peak < e.peak
    budget = 78 * GIB
    assert fits(with_ac, budget) > fits(s, budget) >= 1


def test_plan_command_prints_the_parts_and_what_fits(tmp_path):
    proc = tinytrain_in_process("plan", "--config", RECIPES / "tinyllama-1.1b.yaml",
                                "--world_size", "8", cwd=tmp_path, check=True)
    out = proc.stdout
    assert "model 1,100,048,384 parameters" in out and "micro batch 8 x 16 micro-batches" in out
    for part in ("master weights", "AdamW state", "activations", "loss", "FSDP2 accumulated gradients", "total"):
        assert part in out, part
    assert "fits in 80 GiB" in out
    assert "largest micro batch that fits without activation checkpointing:" in out
    assert "largest micro batch that fits with activation checkpointing:" in out
    measured = tinytrain_in_process("plan", "--config", RECIPES / "ci.yaml", "--measure", cwd=tmp_path,
                                    check=True).stdout
    line = measured.splitlines()[-1]
    assert line.startswith("measured on cpu") and "estimated" in line
    assert abs(float(line.rsplit("(", 1)[1].split("%")[0])) < 15
    bad = tinytrain_in_process("plan", "--config", RECIPES / "ci.yaml", "--world_size", "0", cwd=tmp_path)
    assert bad.returncode == 2 and "--world_size must be positive" in bad.stderr
