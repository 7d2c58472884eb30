"""Every config group option and experiment composes and passes its schema's checks; the public
contract's overrides land where DESIGN.md says; the schemas stay in step with the components'."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rewards.config import CONF_DIR, RewardsConf, compose
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


def test_rewards_schema_mirrors_derive_config():
    from rewards.derive import DeriveConfig

    ours = {f.name: f.default for f in dataclasses.fields(RewardsConf)}
    for f in dataclasses.fields(DeriveConfig):
        if f.name != "config_hash":
            assert ours.get(f.name, "absent") == f.default, f"rewards.{f.name} out of step with DeriveConfig"


def test_group_files_set_only_schema_keys_and_every_schema_key():
    """Each option file spells out its whole group (users read them as the reference)."""
    for group in ("search", "rewards", "ray", "critics"):
        schema = set(OmegaConf.to_container(compose([]))[group])
        for option in _options(group):
            keys = set(OmegaConf.load(Path(CONF_DIR, group, f"{option}.yaml"))) - {"defaults"}
            missing = schema - keys - ({"num_cpus"} if option == "cluster" else set())
            if group == "critics" and option == "rollouts":
                missing -= {"device", "dtype", "batch_size", "rollout_tokens"}  # no model: irrelevant
            assert not missing, f"conf/{group}/{option}.yaml does not set {sorted(missing)}"
