"""TrainConfig validation, presets, overrides, the resume comparison and the schedule."""

import math

import pytest

from gatedfwa.errors import ConfigError
from gatedfwa.train.config import TrainConfig, apply_overrides, parse_set_option, resume_mismatches
from gatedfwa.train.presets import PRESETS, get_preset
from gatedfwa.train.trainer import learning_rate


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid(name):
    TrainConfig.from_dict(get_preset(name), name).validate()


def test_unknown_preset_and_setting_are_named():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*cpu"):
        get_preset("huge")
    with pytest.raises(ConfigError, match="unknown setting.*colour"):
        TrainConfig.from_dict({"colour": 1}, "x.json")


@pytest.mark.parametrize("change, message", [
    ({"attention": "linear"}, "unknown attention kind 'linear'"),
    ({"model": {"attention_kinds": ["gatedfwa", "swa", "full", "nope"]}}, "unknown attention kind 'nope'"),
    ({"model": {"attention_kinds": ["gatedfwa"]}}, "one per layer"),
    ({"model": {"window_size": 512}, "seq_len": 256}, r"window_size \(512\) is larger than the context"),
    ({"seq_len": 0}, "seq_len must be a positive integer"),
    ({"seq_len": 1, "model": {"window_size": 1}}, "seq_len must be at least 2"),
    ({"threads": 0}, "threads must be a positive integer"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"model": {"vocab_size": 10}}, "vocab_size is set by the tokenizer"),
    ({"model": {"hiden_size": 64}}, r"model: unknown setting\(s\) hiden_size; valid model settings \(GatedFWAConfig fields\): hidden_size, "),
])
def test_validation_messages(change, message):
    config = TrainConfig.from_dict(apply_overrides(get_preset("cpu"), change), "test")
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_window_check_ignores_layers_without_a_window():
    # "full" and "forgetting" never use window_size, so it may exceed the context.
    config = TrainConfig.from_dict(apply_overrides(get_preset("cpu"), {"attention": "full", "model": {"window_size": 4096}}), "t")
    config.validate()


def test_micro_steps_split_the_global_batch():
    config = TrainConfig.from_dict(apply_overrides(get_preset("tiny"), {"batch_size": 8, "micro_batch_size": 2}), "t")
    assert config.micro_steps(1) == (2, 4)
    assert config.micro_steps(2) == (2, 2)
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        config.micro_steps(3)


def test_set_option_parsing():
    assert parse_set_option("model.num_hidden_layers=3") == {"model": {"num_hidden_layers": 3}}
    assert parse_set_option("attention=swa") == {"attention": "swa"}
    assert parse_set_option("data=[\"a\", \"b\"]") == {"data": ["a", "b"]}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set_option("oops")


def test_resume_mismatches_allow_run_length_changes_only():
    saved = TrainConfig.from_dict(get_preset("tiny"), "t")
    same = TrainConfig.from_dict(apply_overrides(get_preset("tiny"), {"max_steps": 99, "eval_interval": 3}), "t")
    assert resume_mismatches(saved, same) == []
    # --attention gatedfwa on a gatedfwa checkpoint is the same model.
    assert resume_mismatches(saved, TrainConfig.from_dict(apply_overrides(get_preset("tiny"), {"attention": "gatedfwa"}), "t")) == []
    other = TrainConfig.from_dict(apply_overrides(get_preset("tiny"), {"lr": 1.0, "model": {"hidden_size": 32}}), "t")
    found = resume_mismatches(saved, other)
    assert any(line.startswith("model.hidden_size: 64") for line in found) and any(line.startswith("lr:") for line in found)


def test_learning_rate_warmup_then_cosine():
    config = TrainConfig.from_dict(apply_overrides(get_preset("tiny"), {"lr": 1.0, "warmup_steps": 4, "max_steps": 14}), "t")
    assert learning_rate(config, 0) == pytest.approx(0.25)
    assert learning_rate(config, 3) == pytest.approx(1.0)
    assert learning_rate(config, 4) == pytest.approx(1.0)
    assert learning_rate(config, 9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(config, 14) == pytest.approx(0.1)


def test_unknown_model_keys_list_every_valid_field():
    from gatedfwa.models.configuration import config_fields

    config = TrainConfig.from_dict(apply_overrides(get_preset("tiny"), {"model": {"hiden_size": 1, "windw": 2}}), "t")
    with pytest.raises(ConfigError) as error:
        config.validate()
    message = str(error.value)
    assert "\n" not in message and "hiden_size, windw;" in message
    # Every field but vocab_size (which the data sets) is offered.
    assert all(name in message for name in config_fields() if name != "vocab_size")
    assert "vocab_size" not in message


def test_attention_kinds_are_the_models():
    # The trainer accepts exactly the kinds GatedFWAConfig knows (one list, gatedfwa/attention_kinds.py).
    from gatedfwa.attention_kinds import ATTENTION_KINDS
    from gatedfwa.models.configuration import ATTENTION_KINDS as config_kinds

    assert config_kinds is ATTENTION_KINDS
    for kind in ATTENTION_KINDS:
        TrainConfig.from_dict(apply_overrides(get_preset("tiny"), {"attention": kind}), "t").validate()
