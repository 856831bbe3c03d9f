"""Strict YAML/dataclass config loading: typos and bad values must fail loudly."""

from __future__ import annotations

import dataclasses
import os

import pytest
import yaml

from megatron_sffn.config import FFNConfig, ModelConfig
from megatron_sffn.config.loading import ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict

TINY = {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4}


@dataclasses.dataclass
class Section:
    lr: float = 1e-3
    steps: int = 10
    name: str = "x"
    flags: list[int] = dataclasses.field(default_factory=list)
    maybe: int | None = None
    on: bool = False


@dataclasses.dataclass
class Root:
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(**TINY))
    opt: Section = dataclasses.field(default_factory=Section)


def test_nested_sections_and_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {"model": {**TINY, "ffn": {"structure": "lowrank", "rank": 16}}, "opt": {"lr": "6e-4", "steps": 1e3}}
        )
    )
    cfg = load_config(Root, path, ["opt.flags=[1, 2]", "opt.maybe=3", "opt.on=true"])
    assert cfg.model.ffn == FFNConfig(structure="lowrank", rank=16)
    assert cfg.opt.lr == pytest.approx(6e-4) and cfg.opt.steps == 1000
    assert cfg.opt.flags == [1, 2] and cfg.opt.maybe == 3 and cfg.opt.on is True


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"opt": {"lrr": 1.0}}, "run.yaml:opt.lrr: unknown key in section Section"),
        ({"mdl": {}}, "run.yaml:mdl: unknown key in section Root"),
        ({"opt": {"steps": "ten"}}, "run.yaml:opt.steps: expected an integer, got 'ten'"),
        ({"opt": {"steps": 1.5}}, "run.yaml:opt.steps: expected an integer"),
        ({"opt": {"on": "yes please"}}, "run.yaml:opt.on: expected true/false"),
        ({"opt": {"flags": 3}}, "run.yaml:opt.flags: expected a list"),
        ({"opt": {"flags": [1, "a"]}}, "run.yaml:opt.flags[1]: expected an integer"),
        (
            {"model": {**TINY, "ffn": {"structure": "blockdense", "rank": 30, "blocks": 4}}},
            "rank=30 is not divisible by blocks=4",
        ),
        ({"opt": 5}, "run.yaml:opt: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(tmp_path, data, fragment):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(Root, path)
    assert fragment in str(err.value)


def test_override_errors():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["opt.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"opt": 1}, ["opt.lr=2"])
    with pytest.raises(ConfigError, match="overrides:opt.typo: unknown key"):
        load_config(Root, None, ["opt.typo=1"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Root, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(Root, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(Root, listy)


def test_save_round_trip(tmp_path):
    overrides = [f"model.{k}={v}" for k, v in TINY.items()]
    cfg = load_config(
        Root, None, overrides + ["model.ffn.structure=blockshuffle", "model.ffn.blocks=4", "opt.name=run"]
    )
    out = tmp_path / "sub" / "resolved.yaml"
    save_config(cfg, out)
    assert load_config(Root, out) == cfg
    assert [p.name for p in out.parent.iterdir()] == ["resolved.yaml"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert to_dict(cfg)["model"]["ffn"]["blocks"] == 4


def test_from_dict_model_validation():
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not divisible by num_query_groups=3"):
        from_dict(ModelConfig, {**TINY, "num_query_groups": 3}, "m.yaml")


def test_base_files_merge_and_cycles(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.yaml").write_text(
        yaml.safe_dump({"model": {**TINY, "ffn": {"structure": "lowrank", "rank": 16}}, "opt": {"lr": 1.0}})
    )
    (tmp_path / "run.yaml").write_text(
        yaml.safe_dump({"base": "models/tiny.yaml", "model": {"ffn": {"rank": 8}}, "opt": {"steps": 3}})
    )
    cfg = load_config(Root, tmp_path / "run.yaml")
    assert cfg.model.ffn.rank == 8 and cfg.model.ffn.structure == "lowrank" and cfg.model.hidden_size == 64
    assert cfg.opt.lr == 1.0 and cfg.opt.steps == 3
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="base files form a cycle"):
        load_config(Root, tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found \\(base of"):
        load_config(Root, tmp_path / "c.yaml")
