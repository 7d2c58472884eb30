"""The dataset card: `out/README.md`, what a person opening the directory reads first (counts per
kind and shard, the config, versions, and how to load each kind into TRL)."""

from __future__ import annotations

import json
from pathlib import Path

from rewards import records
from rewards.export import MANIFEST, atomic_write_text, load_manifest
from rewards.records import KINDS

# -- the dataset card -------------------------------------------------------------------------------
_TRAIN_SNIPPET = """\
```python
from datasets import load_dataset
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

data = lambda kind: load_dataset("parquet", data_files=f"{OUT}/{kind}/*.parquet", split="train")

# step-level preference pairs: prompt / chosen / rejected
DPOTrainer(model=POLICY, args=DPOConfig(output_dir="dpo"), train_dataset=data("pairs"), processing_class=tok).train()
# reward model on the same pairs; `margin` (the success-rate gap) is used by the loss when present
RewardTrainer(model=REWARD_MODEL, args=RewardConfig(output_dir="rm"), train_dataset=data("pairs"), processing_class=tok).train()
# unpaired labels: prompt / completion / label
KTOTrainer(model=POLICY, args=KTOConfig(output_dir="kto"), train_dataset=data("kto"), processing_class=tok).train()
# best verified trajectory per problem: prompt / completion
SFTTrainer(model=POLICY, args=SFTConfig(output_dir="sft"), train_dataset=data("sft"), processing_class=tok).train()
```
`steps` is TRL's stepwise-supervision format (prompt / completions / labels, steps separated by "\\n"),
as read by TRL's PRM trainer; `soft_labels` holds the per-step success rates for soft-label training.
`values` holds (prefix text, target) rows for a value head. Extra metadata columns are ignored by the
trainers (they keep only the columns they know), so the files train as they are.

Every shard has a file for every kind, 0-row files included (valid parquet with the schema, no row
group). `datasets` skips those beside non-empty files but refuses a kind whose files are *all* empty
("corresponds to no data"); `datasets.Dataset(pyarrow.parquet.read_table(path))` loads those.
"""


def write_card(out_dir: Path | str) -> Path:
    """`out/README.md`: row counts per file, column tables, the config, how to load and train."""
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir)
    if manifest is None:
        raise ValueError(f"{out_dir} has no {MANIFEST}: write at least one shard before the dataset card")
    docs = records.column_docs()
    yaml = ["---", "configs:"]
    for kind in KINDS:
        if manifest["files"][kind]:
            yaml += [f"- config_name: {kind}", "  data_files:"] + [
                f"  - {f}" for f in manifest["files"][kind]
            ]
    yaml.append("---")
    lines = yaml + [
        "",
        "# arborist tree-search preference dataset",
        "",
        "Derived from MCTS trees over LLM reasoning steps: the backed-up success statistics of sibling",
        "options become step-level preferences. How far the labels are backed by the task verifier and",
        "by fresh rollouts is in `audit.json`.",
        "",
        f"Finished problems: {len(manifest['finished_problem_ids'])}; seeds: {manifest['seeds']}.",
        "",
        "| kind | files | rows |",
        "|---|---:|---:|",
        *[f"| {k} | {len(manifest['files'][k])} | {manifest['rows'][k]} |" for k in KINDS],
        "",
        "Rows per file:",
        "",
        "| file | rows |",
        "|---|---:|",
        *[f"| {s['files'][k]} | {s['rows'][k]} |" for s in manifest["shards"].values() for k in KINDS],
        "",
        "## Loading and training",
        "",
        '`datasets.load_dataset("parquet", data_files="OUT/<kind>/*.parquet", split="train")`, or',
        '`load_dataset("OUT", "<kind>")` through the configs above.',
        "",
        _TRAIN_SNIPPET,
        "## Columns",
        "",
        *[f"### {k}\n\n```\n{docs[k]}\n```\n" for k in KINDS],
        "## Configuration",
        "",
        "```json",
        json.dumps(manifest["config"], indent=2, sort_keys=True),
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(manifest["versions"].items())),
        "",
    ]
    path = out_dir / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path
