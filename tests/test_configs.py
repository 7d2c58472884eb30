"""Every config group option and experiment composes and passes its schema's checks; the public
contract's overrides land where DESIGN.md says; the schemas stay in step with the components'."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rewards.config import CONF_DIR, compose
from rewards.job import JobInputError
from rewards.pipeline import to_schema

GROUPS = ("task", "policy", "critics", "search", "rewards", "ray")
# Options that need a user setting to be complete.
NEEDS = {("task", "jsonl"): ["task.path=problems.jsonl"], ("policy", "hf"): ["policy.path=/models/any"]}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_has_options_and_a_default():
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))["defaults"]
    chosen = {k: v for d in defaults if isinstance(d, dict) for k, v in d.items()}
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ has no option"
        assert chosen[group] in _options(group), f"config.yaml's {group}: {chosen[group]} is not a file"
    assert chosen["experiment"] is None, "experiment is optional and off by default"


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose([f"{group}={option}", *NEEDS.get((group, option), [])])
    conf = to_schema(cfg)  # runs every schema's __post_init__ checks
    assert getattr(conf, group) is not None


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    conf = to_schema(compose([f"experiment={experiment}"]))
    assert conf.task.num_problems <= 16 and conf.search.simulations <= 8, "experiments here are tiny"


def test_defaults_are_the_no_argument_job():
    conf = to_schema(compose([]))
    assert conf.task.name == "countdown" and conf.task.path == "" and conf.task.num_problems >= 1
    assert conf.policy.path == "" and conf.policy.allow_embedded, "no path: the embedded default policy"
    assert set(conf.critics.paths().values()) == {"default"}, "the embedded critics"
    assert conf.ray.address == "local" and conf.ray.num_workers >= 1
    assert conf.out == "arborist-out"


def test_a_countdown_file_is_read_whole_unless_a_count_is_given(tmp_path):
    """The generated count (256) is not a cap on a file of the user's: all 300 rows are kept."""
    import json

    from mcts.tasks.registry import GENERATED_PROBLEMS
    from rewards.pipeline import check_config

    path = tmp_path / "cd.jsonl"
    rows = [{"id": i, "numbers": [2, 3, i % 7 + 1], "target": 6 + i} for i in range(GENERATED_PROBLEMS + 44)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = f"out={tmp_path / 'o'}"
    assert len(check_config(compose([out, f"task.path={path}"])).problems) == len(rows)
    assert len(check_config(compose([out, f"task.path={path}", "task.num_problems=10"])).problems) == 10
    generated = check_config(compose([out]))
    assert len(generated.problems) == GENERATED_PROBLEMS
    assert generated.config["task"]["num_problems"] == GENERATED_PROBLEMS  # in the config hash, as before


def test_public_contract_overrides(tmp_path):
    """The overrides of DESIGN.md's public contract, all at once."""
    problems = tmp_path / "p.jsonl"
    cfg = compose(
        [
            f"out={tmp_path / 'o'}",
            "seed=7",
            "task=jsonl",
            f"task.path={problems}",
            "task.num_problems=5",
            f"policy.path={tmp_path / 'model'}",
            "search.simulations=9",
            "ray.address=auto",
            "ray.num_workers=3",
        ]
    )
    conf = to_schema(cfg)
    assert (conf.out, conf.seed, conf.task.name, conf.task.path) == (
        str(tmp_path / "o"),
        7,
        "jsonl",
        str(problems),
    )
    assert (conf.task.num_problems, conf.policy.path) == (5, str(tmp_path / "model"))
    assert (conf.search.simulations, conf.ray.address, conf.ray.num_workers) == (9, "auto", 3)


def test_hydra_writes_its_logs_under_out_and_keeps_the_working_directory():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["out=some/dir"], return_hydra_config=True)
    assert cfg.hydra.job.chdir is False, "relative paths (task.path, out) must stay relative to the cwd"
    assert str(cfg.hydra.run.dir).startswith("some/dir/logs/")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.simulations=-3", "search.simulations must be >= 1, got -3"),
        ("search.max_depth=0", "search.max_depth must be >= 1"),
        ("search.leaves_per_tree=20000", "search.leaves_per_tree must be <= 16383, got 20000"),
        ("rewards.confidence=1.5", "rewards.confidence"),
        ("rewards.value_target=median", "rewards.value_target"),
        ("ray.torch_threads=0", "ray.torch_threads must be >= 1"),
        ("critics.rollouts=-1", "critics.rollouts must be >= 0"),
        ("policy.top_p=0", "policy.top_p"),
    ],
)
def test_bad_numbers_name_their_key(override, message):
    with pytest.raises(JobInputError, match=message.replace(".", r"\.")):
        to_schema(compose([override]))


def test_python_defaults_are_the_search_arborist_search_runs():
    """One default per setting: a component built in Python with no arguments is the one the
    no-argument job builds (the yaml of the default options adds nothing)."""
    from critics.base import CriticsConfig
    from mcts.base import ExpandConfig, PolicyConfig, SearchConfig
    from rewards.derive import DeriveConfig
    from rewards.worker import as_base

    conf = to_schema(compose([]))
    assert as_base(SearchConfig, conf.search) == SearchConfig()
    assert as_base(PolicyConfig, conf.policy) == PolicyConfig()
    assert conf.critics == CriticsConfig() and as_base(ExpandConfig, conf.critics) == ExpandConfig()
    assert as_base(DeriveConfig, conf.rewards) == DeriveConfig()
    assert DeriveConfig().hash() == conf.rewards.hash(), "the audit's settings do not enter the records' hash"


def _schema_defaults(group: str, option: str) -> dict:
    """The schema's defaults of one group option (what its yaml would get with no keys at all)."""
    schema = OmegaConf.load(Path(CONF_DIR, group, f"{option}.yaml"))["defaults"][0]
    from hydra.core.config_store import ConfigStore

    node = ConfigStore.instance().load(f"{group}/{schema}.yaml").node
    return OmegaConf.to_container(node)


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in _options(g)])
def test_group_files_hold_only_deviations_each_with_its_reason(group, option):
    path = Path(CONF_DIR, group, f"{option}.yaml")
    defaults = _schema_defaults(group, option)
    keys = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k != "defaults"}
    for key, value in keys.items():
        assert key in defaults, f"{path.name}: {key} is not a key of the {group} schema"
        assert value != defaults[key], f"conf/{group}/{option}.yaml repeats the default {key}: {value!r}"
    explained = False  # a comment since the last blank line explains the keys below it
    for line in path.read_text().splitlines():
        if not line.strip():
            explained = False
        elif line.lstrip().startswith("#"):
            explained = True
        elif line.split(":")[0] in keys:
            assert explained or "#" in line, (
                f"conf/{group}/{option}.yaml sets {line.split(':')[0]} without a reason"
            )


def test_the_first_run_is_told_it_trains_the_embedded_models(monkeypatch, tmp_path):
    """An empty cache: the job names the models it trains once, and only the missing ones."""
    from rewards.pipeline import embedded_models_missing

    monkeypatch.setenv("ARBORIST_CACHE", str(tmp_path))
    conf = to_schema(compose([]))
    assert embedded_models_missing(conf) == ["policy", "critic-trunk", "critics"]
    (tmp_path / "default-v1-seed0" / "policy").mkdir(parents=True)
    (tmp_path / "default-v1-seed0" / "critics").mkdir()
    assert embedded_models_missing(conf) == ["critic-trunk"], "the critics' trunk is still missing"
    assert embedded_models_missing(to_schema(compose(["critics=rollouts"]))) == []
    (tmp_path / "default-v1-seed0" / "critic-trunk").mkdir()
    assert embedded_models_missing(conf) == []
    assert embedded_models_missing(to_schema(compose(["policy.path=/models/mine"]))) == []
    from rewards.critic_bootstrap import build_minutes

    one_by_one = sum(build_minutes([name]) for name in ("policy", "critic-trunk", "critics"))
    everything = build_minutes(["policy", "critic-trunk", "critics"])
    assert 0 < build_minutes(["critic-trunk", "critics"]) < everything < one_by_one, "side by side"
