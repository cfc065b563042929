
import pytest
import torch
import yaml
from conftest import RECIPES, make_cli

from tinytrain.commands.main import main
from tinytrain.model.llama import Llama, LlamaConfig

RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))


def test_every_recipe_is_tested():
    assert {p.stem for p in RECIPE_FILES} == {"ci", "tiny", "tiny-moe", "tinyllama-1.1b", "tinyllama-1.1b-continue",
                                              "tinyllama-1.1b-long", "tinyllama-1.1b-moe"}


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=lambda p: p.stem)
def test_recipe_prints_its_resolved_config(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "model:" in out and "data:" in out and "checkpoint:" in out


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=lambda p: p.stem)
def test_recipe_instantiates(recipe, prepared):
    extra = ["--model.init_from", prepared] if recipe.stem.endswith(("continue", "long")) else []
    cli = make_cli("--config", recipe, "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                   "--data.path", prepared, *extra)
    config = cli.model.config
    with torch.device("meta"):
        model = Llama(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    assert cli.datamodule.vocab_size == config.vocab_size  # linked from the model
    preset = {"ci": "ci", "tiny": "tiny", "tinyllama-1.1b": "tinyllama-1.1b", "tiny-moe": "tiny-moe",
              "tinyllama-1.1b-moe": "tinyllama-1.1b-moe",
              "tinyllama-1.1b-continue": "tinyllama-1.1b", "tinyllama-1.1b-long": "tinyllama-1.1b"}[recipe.stem]
    assert config.architecture() == LlamaConfig.from_name(preset).architecture()
    if recipe.stem != "tinyllama-1.1b-long":
        assert config == LlamaConfig.from_name(preset)
    else:  # TinyLlama's weights at 8,192 tokens: only the context window differs
        assert (config.max_position_embeddings, config.rope_theta, config.logit_scaling_window) == (8192, 5e5, 2048)


def test_tinyllama_recipe_is_the_published_run(prepared):
    cli = make_cli("--config", RECIPES / "tinyllama-1.1b.yaml", "--trainer.accelerator", "cpu",
                   "--trainer.devices", "1", "--data.path", prepared)
    o, dm, trainer = cli.model.optim, cli.datamodule, cli.trainer
    assert (o.lr, o.min_lr, o.warmup_steps, o.decay_steps) == (4e-4, 4e-5, 2000, 1_430_512)
    assert tuple(o.betas) == (0.9, 0.95) and o.weight_decay == 0.1 and o.grad_clip == 1.0
    assert (dm.global_batch_size, dm.seq_len, dm.micro_batch_size, dm.seed) == (1024, 2048, 8, 3407)
    assert dm.global_batch_size * dm.seq_len == 2_097_152
    assert [(s.path, s.weight) for s in dm.sources] == [("slimpajama", 0.693584), ("starcoder", 0.306416)]
    assert dm.source_folders(prepare=False) == [prepared / "slimpajama", prepared / "starcoder"]
    assert trainer.max_steps == 1_430_512 and str(trainer.precision) == "bf16-mixed"
    assert type(trainer.strategy).__name__ == "FSDP2"
    assert cli.model.config.num_params() == 1_100_048_384
    # warmup, cosine, floor
    assert o.lr_at(0) == 0 and o.lr_at(1000) == pytest.approx(2e-4) and o.lr_at(2000) == pytest.approx(4e-4)
    mid = (2000 + 1_430_512) // 2
    assert o.lr_at(mid) == pytest.approx((4e-4 + 4e-5) / 2, rel=1e-4)
    assert o.lr_at(1_430_512) == pytest.approx(4e-5) and o.lr_at(2_000_000) == pytest.approx(4e-5)


def test_continue_recipe_starts_from_weights_with_a_fresh_schedule(prepared):
    cli = make_cli("--config", RECIPES / "tinyllama-1.1b-continue.yaml", "--trainer.accelerator", "cpu",
                   "--trainer.devices", "1", "--data.path", prepared, "--model.init_from", "ckpt",
                   "--data.step_offset", "7")
    assert cli.model.init_from == "ckpt" and cli.datamodule.step_offset == 7
    o = cli.model.optim
    assert o.lr_at(0) == 0 and o.warmup_steps < 1000 and o.lr == pytest.approx(4e-5)
    with pytest.raises(ValueError, match="model.init_from is required by this recipe"):
        make_cli("--config", RECIPES / "tinyllama-1.1b-continue.yaml", "--trainer.accelerator", "cpu",
                 "--trainer.devices", "1", "--data.path", prepared)


TUNED_WITH_MUON = ("optimizer", "muon_lr", "embedding_lr", "lr", "schedule", "cooldown_fraction", "cooldown_shape")


def test_moe_recipes_match_their_dense_twins_but_for_the_experts():
    """Same data, length, warmup, decay and attention as the dense recipe (AdamW where the dense one has
    Muon, which refuses the experts' 3-D weights; the dense one's learning rate, schedule shape,
    embedding rate and QK-norm were tuned with Muon, so tiny-moe keeps AdamW's own and no QK-norm); a
    token's MLP costs the same in tiny-moe (2 experts of half the width), and TinyLlama's MLP is each of
    the 1.1B MoE's experts."""
    for dense, sparse in (("tiny", "tiny-moe"), ("tinyllama-1.1b", "tinyllama-1.1b-moe")):
        d, s = (yaml.safe_load((RECIPES / f"{name}.yaml").read_text()) for name in (dense, sparse))
        shared = [{k: v for k, v in r["model"]["optim"].items() if k not in TUNED_WITH_MUON} for r in (d, s)]
        assert shared[0] == shared[1] and d["trainer"]["max_steps"] == s["trainer"]["max_steps"]
        assert {k: v for k, v in d["data"].items() if k != "micro_batch_size"} == \
            {k: v for k, v in s["data"].items() if k != "micro_batch_size"}
        dc, sc = LlamaConfig.from_name(dense), LlamaConfig.from_name(sparse)
        assert sc.moe and sc.num_experts_per_tok * sc.intermediate_size in (dc.intermediate_size, 2 * dc.intermediate_size)
    tiny, tiny_moe = LlamaConfig.from_name("tiny"), LlamaConfig.from_name("tiny-moe")
    assert tiny.qk_norm and tiny.value_embeddings and not tiny_moe.qk_norm and not tiny_moe.value_embeddings
    assert tiny_moe.num_active_params() \
        - LlamaConfig.from_name("tiny", qk_norm=False, value_embeddings=0).num_params() == 6 * 8 * 192


def test_tinyllama_recipe_demands_a_data_path():
    with pytest.raises(ValueError, match="data.path is required by this recipe"):
        make_cli("--config", RECIPES / "tinyllama-1.1b.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "1")


def test_unknown_key_is_an_error_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(RECIPES / "ci.yaml"), "--model.optim.learning_rate", "0.1"])
    assert exit_info.value.code == 2
    assert "learning_rate" in capsys.readouterr().err


def test_unknown_key_in_a_recipe_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES / "ci.yaml").read_text().replace("  seq_len: 64", "  seq_len: 64\n  seq_length: 64"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad)])
    assert exit_info.value.code == 2
    assert "seq_length" in capsys.readouterr().err


def test_wrong_type_is_an_error_naming_the_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(RECIPES / "ci.yaml"), "--data.global_batch_size", "lots"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "global_batch_size" in err and "lots" in err


def test_top_level_help_lists_commands(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert "fit" in out and "generate" in out


def test_tinyllama_data_spec_is_the_published_corpus():
    from tinytrain.commands.prepare import parse_spec

    spec = parse_spec(["--config", str(RECIPES.parent / "data_prep" / "tinyllama.yaml"), "--workers", "8"])
    assert spec.workers == 8 and spec.bos and not spec.eos
    slim, star = spec.sources
    assert (slim.name, slim.text_field, star.name, star.text_field) == ("slimpajama", "text", "starcoder", "content")
    assert slim.filters[0].field == "meta.redpajama_set_name" and slim.filters[0].drop == ["RedPajamaGithub"]
    assert not slim.filters[0].passes({"meta": {"redpajama_set_name": "RedPajamaGithub"}})
    assert slim.filters[0].passes({"meta": {"redpajama_set_name": "RedPajamaArXiv"}})


def test_tiny_recipe_picks_its_precision_from_the_machine(prepared, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="tinytrain"):
        cli = make_cli("--config", RECIPES / "tiny.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                       "--data.path", prepared)
    amx = torch.cpu._is_amx_tile_supported()
    expected = "bf16-mixed" if amx else "32-true"
    assert cli.trainer.precision == expected
    assert any(r.getMessage().startswith(f"trainer.precision: {expected} (null picks it: a CPU with") for r in caplog.records)
    # an explicit choice is kept
    assert make_cli("--config", RECIPES / "tiny.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                    "--data.path", prepared, "--trainer.precision", "32-true").trainer.precision == "32-true"
