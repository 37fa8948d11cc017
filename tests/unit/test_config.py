"""Config validation, overrides and their error messages."""

from pathlib import Path

import pytest
import yaml

from fedumm.config import load_config
from fedumm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, tree):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_defaults_are_paper_lora(tmp_path):
    cfg = load_config(write(tmp_path, {"data": {"path": "d"}}))
    assert (cfg.lora.rank, cfg.lora.alpha) == (16, 32.0)
    assert cfg.federation.strategy == "fedavg"


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"federation\.alpah: unknown key \(did you mean 'alpha'\?\)"):
        load_config(write(tmp_path, {"data": {"path": "d"}, "federation": {"alpah": 1}}))


def test_bad_value_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"federation\.alpha: .*greater than or equal to 0.*-1"):
        load_config(write(tmp_path, {"data": {"path": "d"}, "federation": {"alpha": -1}}))


def test_unknown_strategy_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'fedavg'"):
        load_config(write(tmp_path, {"data": {"path": "d"}, "federation": {"strategy": "fedavgg"}}))


def test_overrides_checked_against_schema(tmp_path):
    p = write(tmp_path, {"data": {"path": "d"}})
    cfg = load_config(p, ["federation.rounds=7", "lora.groups=[language, vision]"])
    assert cfg.federation.rounds == 7 and cfg.lora.groups == ("language", "vision")
    with pytest.raises(ConfigError, match=r"unknown key 'lora.rnak' \(did you mean 'rank'\?\)"):
        load_config(p, ["lora.rnak=4"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(p, ["lora.rank"])
    with pytest.raises(ConfigError, match="lora.rank"):
        load_config(p, ["lora.rank=zero"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_min_clients_cannot_exceed_clients(tmp_path):
    with pytest.raises(ConfigError, match="min_clients"):
        load_config(write(tmp_path, {"data": {"path": "d"}, "federation": {"clients": 2, "min_clients": 3}}))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    if "grid" in (yaml.safe_load(path.read_text()) or {}):  # a sweep file: its base and every cell
        from fedumm.sweep import expand, load_sweep

        assert expand(load_sweep(path))
    else:
        load_config(path)


def _tree(**federation):
    return {"data": {"path": "d"}, "federation": {"clients": 4, **federation}}


def test_task_mixes_per_client():
    assert load_config(None, tree=_tree()).federation.task_of_clients() == ["understanding"] * 4
    assert load_config(None, tree=_tree(tasks="both")).federation.task_of_clients() == ["both"] * 4
    fractions = {"both": 0.5, "generation": 0.25, "understanding": 0.25}
    cfg = load_config(None, tree=_tree(task_fractions=fractions))
    assert cfg.federation.task_of_clients() == ["understanding", "generation", "both", "both"]
    tree = _tree(task_fractions={"both": 0.5, "understanding": 0.5})
    tree["federation"]["clients"] = 3  # 1.5 each: the tie goes to the earlier mix
    assert load_config(None, tree=tree).federation.task_of_clients() == [
        "understanding",
        "understanding",
        "both",
    ]
    explicit = ["generation", "both", "understanding", "understanding"]
    assert load_config(None, tree=_tree(client_tasks=explicit)).federation.task_of_clients() == explicit


@pytest.mark.parametrize(
    ("federation", "message"),
    [
        ({"task_fractions": {"understanding": 0.5}}, "sum to 1"),
        ({"client_tasks": ["both"]}, "client_tasks lists 1 clients"),
        ({"client_tasks": ["both"] * 4, "task_fractions": {"both": 1.0}}, "not both"),
        ({"tasks": "painting"}, "federation.tasks"),
        ({"group_strategies": {"vision": "fedavgg"}}, "fedavg"),
    ],
)
def test_bad_task_mixes_are_one_clear_error(federation, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, tree=_tree(**federation))


def test_generation_clients_need_a_language_or_generation_adapter():
    tree = _tree(tasks="generation")
    tree["lora"] = {"groups": ["vision"]}
    with pytest.raises(ConfigError, match="generation clients need LoRA"):
        load_config(None, tree=tree)


def test_the_family_is_registered_and_names_the_towers():
    with pytest.raises(
        ConfigError, match=r"model.family: unknown model family 'blip3' \(did you mean 'blip3o'\?\)"
    ):
        load_config(None, ["model.family=blip3"], tree=_tree())
    cfg = load_config(
        None, ["model.family=blip3o", "lora.groups=[vision, language, generation]"], tree=_tree()
    )
    assert cfg.model.family == "blip3o" and cfg.model.prompt_template is None  # the family's own prompt
    with pytest.raises(
        ConfigError, match="family 'blip3o' has no tower 'dit'; its towers: vision, language, generation"
    ):
        load_config(None, ["model.family=blip3o", "lora.groups=[dit]"], tree=_tree())
    with pytest.raises(ConfigError, match="group_strategies: family 'janus' has no adapter group 'audio'"):
        load_config(None, ["federation.group_strategies={audio: fedavg}"], tree=_tree())
    cfg = load_config(None, ["federation.group_strategies={alignment: fedavg}"], tree=_tree())
    assert cfg.federation.group_strategies == {"alignment": "fedavg"}


def test_understanding_clients_need_an_adapter_their_task_reaches():
    with pytest.raises(
        ConfigError,
        match=r"understanding clients need LoRA on one of the janus towers \['vision', 'language'\]",
    ):
        load_config(None, ["lora.groups=[generation]"], tree=_tree(tasks="understanding"))
    # the message of a check across sections does not echo the whole config back
    with pytest.raises(ConfigError) as err:
        load_config(None, ["lora.groups=[generation]"], tree=_tree(tasks="understanding"))
    assert "(got" not in str(err.value) and "(top level)" not in str(err.value)
