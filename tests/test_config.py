"""The typed config system: YAML + overrides, typo and type errors, every YAML under configs/."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from alignment.cli import commands
from foundation.config import ConfigError, format_help, load_config, option, save_config
from alignment.sft import SFTConfig

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides_are_typed():
    cfg = load_config(SFTConfig, None, ["train.max_steps=5", "model.name=tiny-llama", "train.lr=3e-4", "adapter.method=full"])
    assert cfg.train.max_steps == 5 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.name == "tiny-llama"
    assert cfg.adapter.method == "full"
    assert cfg.data.sources[0].path == "bundled:sft"


def test_yaml_float_written_as_string_is_accepted(tmp_path):
    # PyYAML reads "1e-5" (no dot) as a string; a float field must still accept it
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-5\n")
    assert load_config(SFTConfig, p).train.lr == pytest.approx(1e-5)


def test_unknown_top_level_key_names_key_line_and_suggestion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name: tiny-llama\ntrian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, p)
    msg = str(err.value)
    assert "trian" in msg and "did you mean 'train'" in msg
    assert f"{p}:3" in msg  # file and line of the bad key


def test_unknown_nested_key_in_override_suggests_dotted_name():
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, None, ["train.max_step=3"])
    assert "train.max_step" in str(err.value) and "train.max_steps" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, None, ["trian.max_steps=3"])
    assert "'trian'" in str(err.value) and "did you mean 'train'" in str(err.value)


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, None, ["train.batch_size=four"])
    assert "train.batch_size" in str(err.value) and "int" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, None, ["assistant_only_loss=maybe"])
    assert "assistant_only_loss" in str(err.value)


def test_impossible_value_names_the_field():
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, None, ["train.lr=-1"])
    assert "train.lr" in str(err.value) and "> 0" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, None, ["data.val_fraction=1.5"])
    assert "data.val_fraction" in str(err.value)


def test_literal_choice_suggests_closest():
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, None, ["adapter.method=lorra"])
    assert "adapter.method" in str(err.value) and "'lora'" in str(err.value)


def test_list_of_sections_validates_each_item(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  sources:\n    - path: a.jsonl\n      weight: 2\n    - path: b.jsonl\n      wieght: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, p)
    assert "data.sources[1].wieght" in str(err.value) and "weight" in str(err.value)
    assert f"{p}:6" in str(err.value)


def test_stage_mismatch_is_rejected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage: rm\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, p, stage="sft")
    assert "'rm' stage" in str(err.value)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(SFTConfig, None, ["train.max_steps=7", "data.sources=[{path: x.jsonl, weight: 0.5}]"])
    path = save_config(cfg, tmp_path / "config.yaml", stage="sft")
    assert yaml.safe_load(path.read_text())["stage"] == "sft"
    again = load_config(SFTConfig, path, stage="sft")
    assert again == cfg


def test_every_field_is_documented():
    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
            if dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else None):
                walk(f.type)

    for name, (module, kind, _) in commands().items():
        if kind == "stage":
            cls = importlib.import_module(module).Config
            help_text = format_help(cls)
            assert "train.max_steps" in help_text or "run.name" in help_text
            walk(cls)


def test_option_requires_a_doc():
    with pytest.raises(TypeError):
        option(1, "")


def test_every_yaml_under_configs_loads():
    """Each config file declares its stage; it must load into that stage's config class."""
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files, "no configs"
    checked = 0
    for path in files:
        data = yaml.safe_load(path.read_text())
        if path.parent.name == "accelerate":
            continue  # accelerate's own format, checked by the distributed tests
        assert isinstance(data, dict) and "stage" in data, f"{path} must declare `stage:`"
        module, kind, _ = commands()[data["stage"]]
        cfg = load_config(importlib.import_module(module).Config, path, stage=data["stage"])
        if kind == "command":  # a round config: the stage configs it names exist and declare their stage
            assert data["stage"] == "round"
            for spec in cfg.stage_specs():
                assert (REPO / spec.config).is_file(), f"{path}: {spec.config} not found"
        checked += 1
    assert checked >= 1


# -- one vocabulary: train.* for optimisation, <method>.* for method knobs, data.sources for inputs


def test_every_stage_reads_train_max_steps_and_train_lr():
    from alignment.methods import METHODS

    for name in ["sft", "rm", *METHODS]:
        module, _, _ = commands()[name]
        cls = importlib.import_module(module).Config
        config = REPO / "configs" / ("rm_helpful.yaml" if name == "rm" else f"{name}.yaml")
        cfg = load_config(cls, config, ["train.max_steps=2", "train.lr=0.003"], stage=name)
        assert (cfg.train.max_steps, cfg.train.lr) == (2, 0.003), name
        assert "data" in {f.name for f in dataclasses.fields(cls)}, f"{name}: its inputs are data.sources"


@dataclasses.dataclass
class _Train:
    lr: float = option(0.1, "learning rate")
    max_steps: int = option(1, "steps")


@dataclasses.dataclass
class _Algo:
    clip: float = option(0.2, "clip")


@dataclasses.dataclass
class _Renamed:
    """A config whose keys were renamed in a release (the mechanism; no shipped config has old names yet)."""

    RENAMED: ClassVar[dict[str, str]] = {"algo.iterations": "train.max_steps", "optim": "train"}

    train: _Train = option(factory=_Train, doc="optimisation")
    algo: _Algo = option(factory=_Algo, doc="the algorithm")


def test_renamed_keys_still_load_with_a_warning_naming_the_new_one(tmp_path, caplog):
    cfg = load_config(_Renamed, None, ["algo.iterations=7", "optim.lr=0.02"])
    assert (cfg.train.max_steps, cfg.train.lr) == (7, 0.02)
    assert "'algo.iterations' is now 'train.max_steps'" in caplog.text and "'optim.lr' is now 'train.lr'" in caplog.text
    old = tmp_path / "old.yaml"
    old.write_text("algo:\n  iterations: 5\n  clip: 0.3\noptim:\n  lr: 0.01\n")
    cfg = load_config(_Renamed, old)
    assert (cfg.train.max_steps, cfg.train.lr, cfg.algo.clip) == (5, 0.01, 0.3)
    assert f"{old}:2: 'algo.iterations' is now 'train.max_steps'" in caplog.text
    assert f"{old}:4: 'optim' is now 'train'" in caplog.text
    # the old and the new name together: which one wins would be a guess
    both = tmp_path / "both.yaml"
    both.write_text("optim:\n  lr: 0.01\ntrain:\n  lr: 0.02\n")
    with pytest.raises(ConfigError, match="both 'optim.lr' and its new name 'train.lr' are set; keep the new one"):
        load_config(_Renamed, both)


def test_no_shipped_config_carries_renamed_keys():
    """Nothing was released under the earlier names, so no config class keeps a map of them (issue 25)."""
    from alignment.cli import commands
    from foundation.config import all_renames

    for name, (module, _, _) in commands().items():
        cls = getattr(importlib.import_module(module), "Config", None)
        if cls is not None:
            assert all_renames(cls) == {}, name


def test_benchmark_sections_of_a_round(tmp_path):
    """eval.<benchmark> is a section; a bare list is its data."""
    from alignment.rounds import RoundConfig

    cfg_file = tmp_path / "round.yaml"
    cfg_file.write_text("stage: round\neval:\n  truthfulqa: [a.json, bundled:truthfulness]\n"
                        "  toxigen: {data: [prompts], per_group: 2, max_new_tokens: 9}\n")
    cfg = load_config(RoundConfig, cfg_file, stage="round")
    assert cfg.eval.truthfulqa.data == ["a.json", "bundled:truthfulness"]
    assert (cfg.eval.toxigen.data, cfg.eval.toxigen.per_group, cfg.eval.toxigen.max_new_tokens) == (["prompts"], 2, 9)
    # overrides: a bare list sets the data and keeps the section's other keys
    cfg = load_config(RoundConfig, cfg_file, ["eval.truthfulqa.sample=7", "eval.truthfulqa=[b.json]", "eval.toxigen=null"],
                      stage="round")
    assert (cfg.eval.truthfulqa.data, cfg.eval.truthfulqa.sample, cfg.eval.toxigen) == (["b.json"], 7, None)
    cfg = load_config(RoundConfig, None, ["eval.truthfulqa.sample=5"])
    assert cfg.eval.truthfulqa.sample == 5 and cfg.eval.truthfulqa.data[-1] == "bundled:truthfulness"
    with pytest.raises(ConfigError, match=r"unknown key 'eval.toxigen.per_grup' \(did you mean 'eval.toxigen.per_group'\?\)"):
        load_config(RoundConfig, cfg_file, ["eval.toxigen.per_grup=3"])
    with pytest.raises(ConfigError, match="eval.truthfulqa.sample: must be > 0 or null"):
        load_config(RoundConfig, cfg_file, ["eval.truthfulqa.sample=0"])
    with pytest.raises(ConfigError, match="unknown key 'eval.truthfulqa_sample'"):  # the pre-section name is gone
        load_config(RoundConfig, cfg_file, ["eval.truthfulqa_sample=4"])


def test_renamed_keys_have_an_end(tmp_path, monkeypatch):
    """Old names load with a warning up to RENAMES_END; from that version on they are refused, naming the new one."""
    import foundation.config as config

    monkeypatch.setattr(config, "_installed_version", lambda: config.RENAMES_END)
    with pytest.raises(ConfigError, match="'algo.iterations' was renamed 'train.max_steps' before 0.2.0"):
        load_config(_Renamed, None, ["algo.iterations=7"])
    old = tmp_path / "old.yaml"
    old.write_text("optim:\n  lr: 0.01\n")
    with pytest.raises(ConfigError, match="'optim' was renamed 'train'"):
        load_config(_Renamed, old)
    assert load_config(_Renamed, None, ["train.max_steps=7"]).train.max_steps == 7


def test_bundled_configs_are_found_from_any_folder(tmp_path, monkeypatch):
    """A round config names its stages' configs as configs/<stage>.yaml: run from another folder (the README's
    walkthrough tried from /tmp), `align round run` failed with "config file not found: configs/sft.yaml"."""
    from foundation.config import REPO_ROOT
    from foundation.launch import launch_command

    monkeypatch.chdir(tmp_path)
    cfg = load_config(SFTConfig, "configs/sft.yaml", ["train.max_steps=3"])
    assert cfg.train.max_steps == 3
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "sft.yaml").write_text("train:\n  max_steps: 7\n")
    assert load_config(SFTConfig, "configs/sft.yaml").train.max_steps == 7  # the folder's own file comes first
    with pytest.raises(ConfigError, match=f"config file not found: configs/nope.yaml \\(nor {REPO_ROOT}/configs/nope.yaml\\)"):
        load_config(SFTConfig, "configs/nope.yaml")
    cmd, _, _ = launch_command("configs/accelerate/ddp.yaml", ["sft"], nproc=2)
    assert str(REPO_ROOT / "configs" / "accelerate" / "ddp.yaml") in cmd or any("align-accelerate-" in c for c in cmd)


@dataclasses.dataclass
class _FakeKnobs:
    beta: float = option(0.1, "the fake method's knob")


@dataclasses.dataclass
class _FakeConfig:
    train: _Train = option(factory=_Train, doc="optimisation")
    fake: _FakeKnobs = option(factory=_FakeKnobs, doc="the method's knobs")


def test_a_method_added_to_the_registry_reaches_the_cli_and_the_rounds(tmp_path, monkeypatch, capsys):
    """The policy-method recipe, walked: one Method line (plus its module and config) and `align --help` lists
    it, `align <name> --config` runs its main with the typed config and overrides, a round config accepts it
    in `methods` and `policy.<name>` and runs its default config, and a misspelt name is refused."""
    import sys
    import types

    from alignment import cli, methods
    from alignment.rounds.config import RoundConfig

    ran = []
    mod = types.ModuleType("fake_method")
    mod.__doc__ = "A fake method: records its config."
    mod.Config, mod.main = _FakeConfig, lambda cfg, resume=False: ran.append((cfg.fake.beta, cfg.train.max_steps, resume))
    monkeypatch.setitem(sys.modules, "fake_method", mod)
    yaml_file = tmp_path / "fake.yaml"
    yaml_file.write_text("fake:\n  beta: 0.5\n")
    monkeypatch.setitem(methods.METHODS, "fake", methods.Method("fake", "fake_method", "a fake method for a test",
                                                                  "comparisons", str(yaml_file)))
    assert cli.main(["--help"]) == 0
    assert "fake" in capsys.readouterr().out.split("a fake method for a test")[0].splitlines()[-1]
    assert cli.main(["fake", "--config", str(yaml_file), "train.max_steps=3", "--resume"]) == 0
    assert ran == [(0.5, 3, True)]
    assert cli.main(["fake", "--config", str(yaml_file), "fake.betta=1"]) == 2
    assert "fake.betta" in capsys.readouterr().err
    cfg = RoundConfig(methods=["dpo", "fake"])
    assert cfg.method(2) == "fake" and cfg.spec("fake").config == str(yaml_file)
    with pytest.raises(ConfigError, match="unknown method 'fakee'"):
        RoundConfig(methods=["fakee"])
