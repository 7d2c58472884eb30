"""The embedded default policy: a tiny character-level Llama trained here on Countdown traces.

`arborist search` with no `policy.path` needs a model on a fresh machine with no download, so the
project trains its own: `bootstrap_policy()` trains it once (650 fixed steps, about 2.5 minutes
of one CPU thread on an idle machine), evaluates it, and caches it at
`<cache>/default-v1-seed{seed}/policy`, where `<cache>` is `$ARBORIST_CACHE` or `~/.cache/arborist`.

Difficulty (`default_difficulty()`): 3-4 numbers from 1-9, targets 1-60 (the CountdownDifficulty
defaults). DESIGN.md measured that a sub-1M model partly learns this in minutes, while numbers up
to 20 / targets up to 100 leave it at ~2 % greedy: too weak for search to have anything to work with.

Recipe (deliberately small, so the policy is useful but clearly imperfect and search matters):
a 4-layer, d=128 Llama with tied embeddings (~0.78M parameters) over the character vocabulary of
`mcts.charlm`; plain next-token training on solver traces `prompt + steps joined by "\\n" + "\\n" +
</s>`, with the loss on the solution only (the prompt's random numbers are not worth modelling);
650 AdamW steps of 64 sequences (lr 3e-3, 20 warmup steps, cosine decay to 5 %), one torch thread
with deterministic algorithms, so the same seed gives the same weights bit for bit on one kind of
CPU (another kind's kernels round differently and build other weights: `built_on` in
`bootstrap.json` says where a build was made; docs/measurements.md, "A second machine").
The step count is fixed so the result is reproducible; a 5-minute wall-clock cap is a safety net
for an overloaded machine, and `bootstrap.json` records when it was hit (the model is then weaker
and not the reproducible one). One thread, not two: OpenMP threads spin-wait when other processes
share the cores, which made 2-thread steps up to 20x slower in our measurements.

Seeds: training problems come from seeds `TRAIN_SEED_BASE + 1000 * seed + chunk` (1_000_000 and
up; evaluation and the main job use small seeds); evaluation
uses `EVAL_SEED` = 7, and every (numbers, target) of the first `EVAL_EXCLUDE` evaluation problems
is removed from the training set. The problem space is small (~20k distinct problems), so problems
drawn with other seeds (the main job's) will often have been seen in training.

Measured (seed 0, 200 held-out problems; see `bootstrap.json` in the cache for each run):
0.78M parameters, 650 steps, 144 s of training (139 s CPU, one thread), 149 s wall in all with
the evaluation: greedy success 19.5 %, pass@8 (temperature 1) 54.5 %, single-sample 16.1 %. The
final training loss was 0.20 per solution token: most single samples fail while 8 samples often
contain a solution, which is the room tree search needs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mcts.charlm import (
    build_char_tokenizer,
    encode_pairs,
    num_params,
    save_model_dir,
    tiny_llama_config,
    warmup_cosine,
)
from mcts.policy import Policy, PolicyConfig
from mcts.tasks.base import content_key
from mcts.tasks.countdown import CountdownDifficulty, CountdownTask, generate_problems, solve

VERSION = "default-v1"
TRAIN_SEED_BASE = 1_000_000  # training problems: seed TRAIN_SEED_BASE + bootstrap seed
EVAL_SEED = 7  # held-out evaluation problems (bootstrap.json figures, quality benchmark)
EVAL_EXCLUDE = 1000  # (numbers, target) of this many eval problems never appear in training


def cache_dir() -> Path:
    """`$ARBORIST_CACHE` or `~/.cache/arborist`."""
    return Path(os.environ.get("ARBORIST_CACHE") or Path.home() / ".cache" / "arborist")


def default_policy_dir(seed: int = 0) -> Path:
    """Where `bootstrap_policy(seed)` puts the model: `<cache>/default-v1-seed{seed}/policy`."""
    return cache_dir() / f"{VERSION}-seed{seed}" / "policy"


def default_difficulty() -> CountdownDifficulty:
    """3-4 numbers from 1-9, targets 1-60: see the module docstring for why."""
    return CountdownDifficulty(min_numbers=3, max_numbers=4, max_number=9, max_target=60)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe of the embedded policy (the defaults are the shipped model's)."""

    steps: int = 650  # optimizer steps (fixed: the result must not depend on machine speed)
    batch_size: int = 64  # sequences per step (more, smaller steps learn faster at this size)
    lr: float = 3e-3  # peak learning rate (tiny models take a high one)
    warmup: int = 20  # linear warmup steps
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    time_cap_s: float = 300.0  # safety net for an overloaded machine; a hit is reported
    threads: int = 1  # fixed where float reductions differ across thread counts (`mcts.aside.threads_agree`),
    # and 2 threads crawl when other processes share the cores (OpenMP spin-waits)
    eval_problems: int = 200  # held-out problems for the greedy / pass@8 figures (0: skip)
    eval_samples: int = 8


def held_out_keys() -> set[str]:
    """Content keys of the held-out pool (the first EVAL_EXCLUDE problems of EVAL_SEED): no training
    set of the embedded models, the critics' or `arborist improve`'s holds any of them."""
    return {_key(p) for p in generate_problems(EVAL_EXCLUDE, EVAL_SEED, default_difficulty())}


def training_problems(n: int, seed: int, difficulty: CountdownDifficulty) -> list:
    """The `n` problems whose solver traces the model trains on (held-out pool removed by content)."""
    held_out = {_key(p) for p in generate_problems(EVAL_EXCLUDE, EVAL_SEED, difficulty)}
    out: list = []
    chunk = 0
    while len(out) < n:
        # Chunks with distinct seeds, so asking for more data extends the list, never reshuffles it.
        for p in generate_problems(max(n, 1000), TRAIN_SEED_BASE + seed * 1000 + chunk, difficulty):
            if _key(p) not in held_out:
                out.append(p)
        chunk += 1
    return out[:n]


def training_texts(
    n: int, seed: int, difficulty: CountdownDifficulty, problems: list | None = None
) -> list[tuple[str, str]]:
    """`n` (prompt, solution) pairs from solver traces; solution = steps + "\\n" each, no EOS
    (of `problems` when given: `training_problems(n, seed, difficulty)` drawn already)."""
    task = CountdownTask()
    return [
        (task.prompt(p), "".join(s + "\n" for s in solve(p.meta["numbers"], p.meta["target"])))
        for p in (problems if problems is not None else training_problems(n, seed, difficulty))
    ]


def _trained_on_file(seed: int, train: TrainConfig, root: Path | None = None) -> tuple[Path, dict]:
    """Where the keys of `train`'s training set are kept (`root/trained-on/`, `root` by default the
    embedded models' `<cache>/default-v1-seed{seed}`), and the recipe they belong to."""
    recipe = {
        "version": VERSION,
        "seed": seed,
        "problems": train.steps * train.batch_size,
        "difficulty": asdict(default_difficulty()),
        "seeds": [TRAIN_SEED_BASE, EVAL_SEED, EVAL_EXCLUDE],
        # the first training problem's key: a change to the generator or to the key's format shows
        "first": _key(training_problems(1, seed, default_difficulty())[0]),
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    root = root if root is not None else cache_dir() / f"{VERSION}-seed{seed}"
    return root / "trained-on" / f"{digest}.json", recipe


def _keep_trained_on(path: Path, recipe: dict, keys: set[str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"recipe": recipe, "keys": sorted(keys)}))
        os.replace(tmp, path)  # atomic: a reader sees the whole file or none
    except OSError:
        pass  # a read-only cache: the keys are drawn again next time
    finally:
        tmp.unlink(missing_ok=True)


def trained_on(seed: int = 0, train: TrainConfig | None = None) -> set[str]:
    """Content keys (`mcts.tasks.base.content_key`) of every problem a model built by
    `bootstrap_policy(seed, train=train)` saw in training. Drawing them again takes ~1 s per 40k
    training sequences (11 s for the critics' trunk, which the job's audit asks for every run), so
    they are kept (`<cache>/default-v1-seed{seed}/trained-on/<recipe hash>.json`), by the build
    itself or once drawn here."""
    train = train or TrainConfig()
    path, recipe = _trained_on_file(seed, train)
    try:
        kept = json.loads(path.read_text())
        if isinstance(kept, dict) and kept.get("recipe") == recipe and isinstance(kept.get("keys"), list):
            return set(kept["keys"])
    except (OSError, ValueError):
        pass  # not kept yet, or unreadable: drawn again below
    keys = {_key(p) for p in training_problems(recipe["problems"], seed, default_difficulty())}
    _keep_trained_on(path, recipe, keys)
    return keys


# The held-out pool (the first EVAL_EXCLUDE problems of EVAL_SEED, removed by content from every
# training set) in three slices by pool index, each distinct by content and disjoint from the
# slices before it: "tune" is what benchmarks and recipes were chosen on, "audit" is what the job's
# audit measures the embedded critics on, "test" is touched by no tuning (headline figures).
EVAL_SPLITS = {"tune": (0, 300), "audit": (300, 500), "test": (500, EVAL_EXCLUDE)}


def evaluation_problems(split: str, n: int | None = None) -> list:
    """Up to `n` problems of one slice of the held-out pool (all of it when n is None)."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown evaluation split {split!r}: use one of {sorted(EVAL_SPLITS)}")
    pool = generate_problems(EVAL_EXCLUDE, EVAL_SEED, default_difficulty())
    seen: set = set()
    out = []
    for name, (lo, hi) in EVAL_SPLITS.items():
        for p in pool[lo:hi]:
            if _key(p) in seen:
                continue
            seen.add(_key(p))
            if name == split:
                out.append(p)
        if name == split:
            break
    return out if n is None else out[:n]


def _key(p) -> str:
    return content_key(p.question, p.meta)


def train_policy(
    out_dir: Path,
    seed: int,
    cfg: TrainConfig,
    difficulty: CountdownDifficulty,
    progress: bool = True,
    name: str = "policy",
    step_hook: Callable[[int], None] | None = None,
    seen: set[str] | None = None,
) -> dict:
    """Train the model from scratch into `out_dir` (safetensors + tokenizer); return a report.
    `seen` receives the training problems' content keys.
    `step_hook(step)` runs before each step (`rewards.critic_bootstrap` moves a build running beside
    another onto more threads with it, where that leaves the weights as they are)."""
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    t0, c0 = time.perf_counter(), time.process_time()
    tok = build_char_tokenizer()
    problems = training_problems(cfg.steps * cfg.batch_size, seed, difficulty)
    if seen is not None:
        seen.update(_key(p) for p in problems)
    ids, labels = encode_pairs(training_texts(len(problems), seed, difficulty, problems), tok)
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # weight init uses the global generator
        model = LlamaForCausalLM(
            tiny_llama_config(
                len(tok), cfg.d_model, cfg.n_layers, cfg.n_heads, max_len=ids.shape[1] + 64, tok=tok
            )
        )
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: warmup_cosine(i, cfg.steps, cfg.warmup))
        order = torch.randperm(len(ids), generator=gen)
        capped_at = None
        bar = tqdm(
            range(cfg.steps),
            desc=f"training the embedded {name}",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        loss_val = math.nan
        for step in bar:
            if time.perf_counter() - t0 > cfg.time_cap_s:
                capped_at = step
                break
            if step_hook is not None:
                step_hook(step)
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x, y = ids[idx], labels[idx]
            width = int((y != -100).nonzero()[:, 1].max()) + 1  # trim the shared right padding
            loss = model(input_ids=x[:, :width], labels=y[:, :width]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            loss_val = float(loss.detach())
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss_val:.3f}")
        model.eval()
        save_model_dir(model, tok, out_dir)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    return {
        "steps_done": capped_at if capped_at is not None else cfg.steps,
        "time_cap_hit": capped_at is not None,
        "final_loss": loss_val,
        "params": num_params(model),
        "train_seconds": round(time.perf_counter() - t0, 1),
        # CPU seconds: with one thread, what the wall time is on an otherwise idle machine.
        "train_cpu_seconds": round(time.process_time() - c0, 1),
    }


def evaluate_policy(
    path: Path, difficulty: CountdownDifficulty, n: int = 200, samples: int = 8, seed: int = EVAL_SEED
) -> dict:
    """Greedy success and pass@`samples` (temperature 1) on `n` problems of seed `seed`."""
    task = CountdownTask()
    problems = generate_problems(n, seed, difficulty)
    policy = Policy.load(PolicyConfig(path=str(path), device="cpu", max_rollout_tokens=64))
    prompts = [task.prompt(p) for p in problems]
    greedy = [
        task.check(p, r.steps).success is True for p, r in zip(problems, policy.greedy(prompts), strict=True)
    ]
    outs = policy.rollout([q for q in prompts for _ in range(samples)], seed=seed)
    hits = [task.check(problems[i // samples], r.steps).success is True for i, r in enumerate(outs)]
    any_hit = [any(hits[i * samples : (i + 1) * samples]) for i in range(n)]
    return {
        "eval_seed": seed,
        "eval_problems": n,
        "greedy_success": sum(greedy) / n,
        f"pass@{samples}": sum(any_hit) / n,
        "sample_success": sum(hits) / len(hits),
    }


def train_minutes(train: TrainConfig) -> float:
    """Roughly how long `train_policy` takes on a slow 2-core machine (the EPYC): ~0.3 s a step on one
    thread, half on two."""
    return train.steps * 0.3 / train.threads / 60


def bootstrap_policy(
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    train: TrainConfig | None = None,
    root: Path | None = None,
    name: str = "policy",
    step_hook: Callable[[int], None] | None = None,
) -> Path:
    """Return the directory of the embedded default policy, training it first if not cached.

    The model is trained and evaluated in a temporary directory next to the final one, then
    moved into place with `os.replace`, so a killed bootstrap never leaves a half-written model:
    the directory exists only once it is complete. `train` and `root` (instead of
    `<cache>/default-v1-seed{seed}`) are for tests and experiments; `name` is the directory under
    `root` (the critics' own trunk, `rewards.critic_bootstrap`, is the same model trained longer);
    `step_hook` goes to `train_policy`.
    """
    train = train or TrainConfig()
    root = Path(root) if root is not None else default_policy_dir(seed).parent
    final = root / name
    if final.is_dir() and not force:
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root, name)
    difficulty = default_difficulty()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-tmp-", dir=root))
    try:
        if progress:
            minutes = max(1, round(train_minutes(train)))
            print(
                f"arborist: training the embedded {name} into {final} (once, ~{minutes} min)", file=sys.stderr
            )
        t0 = time.perf_counter()
        seen: set[str] = set()
        report = train_policy(
            tmp, seed, train, difficulty, progress=progress, name=name, step_hook=step_hook, seen=seen
        )
        if report["time_cap_hit"]:
            print(
                f"arborist: training hit its {train.time_cap_s:.0f} s safety cap at step "
                f"{report['steps_done']}/{train.steps}; the model is not the reproducible one",
                file=sys.stderr,
            )
        if train.eval_problems:
            threads = torch.get_num_threads()
            torch.set_num_threads(train.threads)  # same reason as in training
            try:
                report.update(evaluate_policy(tmp, difficulty, train.eval_problems, train.eval_samples))
            finally:
                torch.set_num_threads(threads)
        report.update(
            version=VERSION,
            seed=seed,
            train_seed_base=TRAIN_SEED_BASE + 1000 * seed,
            train=asdict(train),
            difficulty=asdict(difficulty),
            wall_seconds=round(time.perf_counter() - t0, 1),
            weights_sha256=weights_hash(tmp),
            built_on=built_on(),  # the CPU and torch the weights were built with
        )
        (tmp / "bootstrap.json").write_text(json.dumps(report, indent=2) + "\n")
        if force and final.exists():
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same bootstrap first (the target is a non-empty
            # directory): theirs is complete and equivalent, keep it.
            if not (final / "bootstrap.json").is_file():
                raise
        _keep_trained_on(*_trained_on_file(seed, train, root), seen)  # what `trained_on` would draw again
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        figures = {k: report[k] for k in ("greedy_success", "pass@8") if k in report}
        print(f"arborist: embedded {name} ready ({report['params']} params, {figures})", file=sys.stderr)
    return final


def built_on() -> dict:
    """Where a model is built: the same recipe and seed give the same weights only on the same kind
    of CPU, whose kernels (torch's vector width, MKL's matrix products) fix the rounding."""
    try:
        names = [x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name")]
    except OSError:
        names = []
    cpu = names[0].split(":", 1)[1].strip() if names else os.uname().machine
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def _remove_stale_temps(root: Path, name: str, older_than_s: float = 3600.0) -> None:
    """Delete temp dirs of bootstraps killed by a signal (no `finally` ran); fresh ones may belong
    to a bootstrap running right now in another process, so only old ones go."""
    now = time.time()
    for tmp in root.glob(f".{name}-tmp-*"):
        if now - tmp.stat().st_mtime > older_than_s:
            shutil.rmtree(tmp, ignore_errors=True)


def weights_hash(path: Path) -> str:
    """sha256 of the model's tensors (names, dtypes, shapes, bytes): equal iff equal weights."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors = load_file(f)
        for name in sorted(tensors):
            t = tensors[name]
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
