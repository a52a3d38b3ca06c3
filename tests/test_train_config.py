"""train/config.py: YAML + dotted overrides -> frozen typed RunConfig, with clear errors."""

import dataclasses

import pytest

from train.config import (
    ConfigError,
    RunConfig,
    config_to_yaml,
    load_config,
    resolve_path,
    save_config,
)

from train_fixtures import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.method in {"lora", "full", "bitfit"}
    assert (
        resolve_path(cfg.data.path).resolve()
        == (REPO_ROOT / "../shared/data/e2e/devset.csv").resolve()
    )


def test_shipped_configs_are_the_lora_and_full_demo():
    lora, full = (load_config(REPO_ROOT / f"configs/e2e_{m}.yaml") for m in ("lora", "full"))
    assert (lora.method, full.method) == ("lora", "full")
    assert lora.data == full.data and lora.optim.max_steps == full.optim.max_steps


def test_overrides_apply_with_types_and_later_ones_win():
    cfg = load_config(
        REPO_ROOT / "configs/e2e_lora.yaml",
        [
            "lora.rank=4",
            "lora.rank=2",
            "data.path=/x.csv",
            "lora.targets=[q_proj,k_proj,v_proj]",
            "lora.rank_pattern={q_proj: 16}",
            "optim.max_steps=null",
            "optim.learning_rate=3e-4",
            "data.packing=true",
            "checkpoint.dir=${output_dir}/ckpt",
            "method=bitfit",
        ],
    )
    assert cfg.lora.rank == 2
    assert cfg.data.path == "/x.csv"
    assert cfg.lora.targets == ("q_proj", "k_proj", "v_proj")
    assert cfg.lora.rank_pattern == {"q_proj": 16}
    assert cfg.optim.max_steps is None and cfg.optim.learning_rate == 3e-4
    assert cfg.data.packing is True and cfg.method == "bitfit"
    assert cfg.checkpoint.dir == "runs/e2e_lora/ckpt"
    assert cfg.data.max_length == 96  # untouched YAML value survives


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.model.name == "smollm2-135m" and cfg.data.path is None and cfg.data.eos_token is None


@pytest.mark.parametrize(
    "override, hint",
    [
        ("lora.rnak=4", "did you mean 'lora.rank'?"),
        ("rank=4", "did you mean 'lora.rank'?"),
        ("data.rank=4", "did you mean 'lora.rank'?"),
        ("optim.learnig_rate=1e-3", "did you mean 'optim.learning_rate'?"),
        ("data.batchsize=4", "did you mean 'data.batch_size'?"),
        ("optim.lr=1e-3", "valid keys in 'optim': learning_rate,"),
    ],
)
def test_unknown_override_key_suggests_the_closest(override, hint):
    with pytest.raises(ConfigError, match="unknown config key") as e:
        load_config(None, [override])
    assert hint in str(e.value) and override.split("=")[0] in str(e.value)


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora:\n  rank: 4\n  alhpa: 8\n")
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'lora.alhpa' in config file "
        r".*bad.yaml; did you mean 'lora.alpha'\?",
    ):
        load_config(path)


@pytest.mark.parametrize(
    "override, key",
    [
        ("lora.rank=abc", "lora.rank"),
        ("lora.rank=2.5", "lora.rank"),
        ("data.format=csv", "data.format"),
        ("optim.learning_rate=fast", "optim.learning_rate"),
        ("data.packing=maybe", "data.packing"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}' in override"):
        load_config(None, [override])


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  batch_size: eight\n")
    with pytest.raises(ConfigError, match="config key 'data.batch_size' in config file"):
        load_config(path)


@pytest.mark.parametrize(
    "override, match",
    [
        ("lora=8", "'lora' .* is a section"),
        ("lora.rank=0", "'lora.rank' must be >= 1"),
        ("lora.alpha=0", "'lora.alpha' must be > 0"),
        ("lora.init=kaiming", "lora.init"),
        ("data.validation_fraction=1.0", "'data.validation_fraction' must be < 1"),
        ("mesh.fsdp=-1", "at most one mesh axis may be -1"),
        ("mesh.tensor=0", "mesh.tensor"),
        ("lora.targets=[]", "lora.targets is empty"),
        ("lora.rank", "not of the form key=value"),
    ],
)
def test_invalid_values_are_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_config_file_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match="configs/e2e_lora.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_round_trip(tmp_path):
    cfg = load_config(
        REPO_ROOT / "configs/e2e_lora.yaml",
        [
            "lora.alpha_pattern={o_proj: 2.5}",
            "lora.targets=[q_proj]",
            "optim.grad_clip=null",
            "eval.num_batches=3",
            "seed=7",
        ],
    )
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert config_to_yaml(load_config(path)) == path.read_text()
    shipped = load_config(REPO_ROOT / "configs/e2e_lora.yaml")  # regex targets survive YAML
    assert load_config(save_config(shipped, tmp_path / "shipped.yaml")) == shipped


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora.rank = 3


def test_relative_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("../shared/x.csv") == tmp_path / "../shared/x.csv"
    assert resolve_path("runs/a") == tmp_path / "runs/a"
    assert resolve_path("/abs/x.csv").as_posix() == "/abs/x.csv"
