"""lj.LoraConfig validates itself and computes per-path rank, alpha and scale."""

import dataclasses
import math

import pytest

import lora_jax as lj


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(rank=0), "rank"),
        (dict(rank=-2), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(alpha=0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(init="xavier"), "init"),
        (dict(bias="some"), "bias"),
        (dict(targets=""), "targets"),
        (dict(targets="(q_proj"), "targets"),
        (dict(rank_pattern={"q": 0}), "rank_pattern"),
        (dict(alpha_pattern={"q": -1.0}), "alpha_pattern"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    base = dict(rank=4, alpha=8, targets=".*kernel")
    with pytest.raises(ValueError, match=field):
        lj.LoraConfig(**{**base, **kwargs})


def test_scaling_rules():
    cfg = lj.LoraConfig(rank=8, alpha=16, targets="x")
    assert cfg.scale_for("a/kernel") == 2.0
    assert dataclasses.replace(cfg, use_rslora=True).scale_for("a/kernel") == 16 / math.sqrt(8)


def test_patterns_match_trailing_segments_like_peft():
    cfg = lj.LoraConfig(
        rank=8, alpha=16, targets="x", rank_pattern={"q_proj": 2, r"layers_1/.*": 4}
    )
    assert cfg.rank_for("layers_0/attn/q_proj/kernel") == 2
    assert cfg.rank_for("layers_1/attn/v_proj/kernel") == 4
    assert cfg.rank_for("layers_0/attn/v_proj/kernel") == 8
    assert cfg.rank_for("layers_0/attn/xq_proj/kernel") == 8  # no partial-name match


def test_frozen_and_serialisable():
    cfg = lj.LoraConfig(rank=8, alpha=16, targets=["a", "b"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 2
    assert lj.LoraConfig(**cfg.to_dict()) == dataclasses.replace(cfg, targets=["a", "b"])
    assert cfg.is_target("x/b/kernel") and not cfg.is_target("x/c/kernel")
    assert not lj.LoraConfig(rank=8, alpha=16, targets="^b$").is_target("ab")


def test_one_pattern_rule_for_parameter_paths_and_peft_module_names():
    from lora_jax._config import pattern_matches, pattern_value

    assert pattern_matches("q_proj", "layers_0/attn/q_proj")
    assert pattern_matches("q_proj", "model.layers.0.self_attn.q_proj", sep=".")
    assert pattern_matches(r"layers\.0\..*", "model.layers.0.self_attn.q_proj", sep=".")
    assert not pattern_matches("q_proj", "model.layers.0.self_attn.xq_proj", sep=".")
    assert not pattern_matches("q_proj", "layers_0/attn/q_proj", sep=".")  # other separator
    assert pattern_value({"v_proj": 1, "q_proj": 2, "proj": 3}, 8, "a.q_proj", sep=".") == 2
    assert pattern_value(None, 8, "a/q_proj/kernel", "a/q_proj") == 8
