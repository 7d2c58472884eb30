"""Learned critics over `transformers` models with a one-logit head: loading, text layout, scoring.

| kind  | model class                           | where the logit is read                |
|-------|---------------------------------------|----------------------------------------|
| value | AutoModelForSequenceClassification    | last token of prompt + steps           |
| orm   | AutoModelForSequenceClassification    | last token of prompt + steps           |
| prm   | AutoModelForTokenClassification       | the separator token ending each step   |

All have `num_labels=1`; the probability is sigmoid(logit). Text layout (TRL's stepwise supervision,
`prompt` / `completions` / `labels`): the prompt tokenized without special tokens and prefixed
with BOS when the tokenizer has one, then each step's tokens followed by the separator's tokens.
A PRM label sits on the last separator token of its step; the value function and ORM read the
same sequence's last token (the separator after the last step), so all three see the exact text
the policy conditioned on. Sequences are right-padded.

Critic directories are `save_pretrained` output (safetensors + tokenizer) plus `critic.json`
(kind, training figures, and `logit_offset`, added to every logit before the sigmoid: 0 unless
the critic was trained with a class-balanced loss or beside rows of another source). Nothing is
downloaded: `local_files_only=True`, safetensors only.

An ensemble (`critics.train`'s `value_members`) is one such directory whose critic.json names
`members`: sub-directories, each a critic of the same kind on the same frozen trunk
(`shares_trunk`), trained with another seed. Its logit is the mean of the directory's own and its
members' logits, then its own `logit_offset`: one pass through the trunk, one top block and head
per member.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from critics.metrics import json_safe, read_json_object
from mcts.hf import resolve_device, resolve_dtype
from mcts.tasks.base import Problem, Task

SEQ_KINDS = ("value", "orm")
CLASSES = {
    "value": "sequence classification",
    "orm": "sequence classification",
    "prm": "token classification",
}


class CriticLoadError(ValueError):
    """A critic directory cannot be loaded; the message is one line saying how to fix it."""


def auto_class(kind: str):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    assert kind in CLASSES, f"unknown critic kind {kind!r}: use one of {sorted(CLASSES)}"
    return AutoModelForSequenceClassification if kind in SEQ_KINDS else AutoModelForTokenClassification


# -- text layout ------------------------------------------------------------------------------------
class StepEncoder:
    """Token ids of prompt + steps in the TRL stepwise layout, and the position ending each step."""

    def __init__(self, tokenizer, separator: str):
        self.tok = tokenizer
        self.sep_ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
        assert self.sep_ids, f"the tokenizer encodes the step separator {separator!r} to no token"
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def encode(self, prompts: list[str], steps: list[list[str]]) -> tuple[list[list[int]], list[list[int]]]:
        """(ids per item, step-end positions per item). Tokenizes every distinct piece once, in one
        batched call: a round of search repeats the same prompts and steps many times."""
        pieces = sorted({*prompts, *(s for row in steps for s in row)})
        table = dict(zip(pieces, self.tok(pieces, add_special_tokens=False)["input_ids"], strict=True))
        all_ids, all_ends = [], []
        for prompt, row in zip(prompts, steps, strict=True):
            ids = self.bos + table[prompt]
            ends = []
            for s in row:
                ids = ids + table[s] + self.sep_ids
                ends.append(len(ids) - 1)
            all_ids.append(ids)
            all_ends.append(ends)
        return all_ids, all_ends


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [n, width] and attention mask [n, width]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def step_logits(model, kind: str, ids: torch.Tensor, mask: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Logits [n, k] at `ends` [n, k] (PRM: per step end; value/ORM: `ends` is the last token, k=1,
    and the model pools it itself)."""
    out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    if kind in SEQ_KINDS:
        return out.view(-1, 1)
    return out[..., 0].gather(1, ends)


# -- scoring ----------------------------------------------------------------------------------------
class ModelCritic:
    """A value function, PRM or ORM over a local model; `score` implements `critics.base.Critic`.

    `forward_calls` counts model forwards (one per `batch_size` chunk of a `score` call).
    """

    def __init__(
        self,
        model,
        tokenizer,
        kind: str,
        task: Task,
        device,
        batch_size: int = 256,
        logit_offset: float = 0.0,
    ):
        assert kind in CLASSES, f"unknown critic kind {kind!r}"
        self.model, self.tok, self.kind, self.task = model, tokenizer, kind, task
        self.device, self.batch_size = torch.device(device), batch_size
        # added to every logit: undoes a class-balanced loss's shift (see critics.train)
        self.logit_offset = float(logit_offset)
        self.encoder = StepEncoder(tokenizer, task.step_separator)
        self.forward_calls = 0
        # critics whose logits are averaged with this one's, read from this one's trunk pass
        self.members: list[ModelCritic] = []

    def score(self, problems: list[Problem], steps: list[list[str]]) -> np.ndarray:
        """Probability per item [n]: PRM = its last step's soundness; value/ORM = the whole text."""
        assert len(steps) == len(problems), f"{len(problems)} problems but {len(steps)} step lists"
        probs = self.score_texts([self.task.prompt(p) for p in problems], steps, every_step=False)
        return np.array([p[-1] for p in probs]) if probs else np.zeros(0)

    def score_with(self, rider: ModelCritic, problems: list[Problem], steps: list[list[str]]):
        """(this critic's `score`, `rider`'s) from one pass through the trunk they share
        (`shares_trunk`): the rider runs only its own top block and head."""
        riders: dict[int, np.ndarray] = {}
        probs = self.score_texts([self.task.prompt(p) for p in problems], steps, False, (rider, riders))
        last = np.array([p[-1] for p in probs]) if probs else np.zeros(0)
        return last, np.array([riders[i] for i in range(len(problems))]) if probs else np.zeros(0)

    @torch.inference_mode()
    def score_texts(
        self, prompts: list[str], steps: list[list[str]], every_step: bool = True, rider=None
    ) -> list[np.ndarray]:
        """Per item, probabilities [k]: the PRM with `every_step` scores each step end (k = steps, the
        TRL stepwise positions), otherwise k = 1 (last step end, or the pooled value/ORM logit).
        One forward per `batch_size` chunk. `rider`: (a critic sharing this one's trunk, a dict that
        receives its probability per item)."""
        n = len(prompts)
        ids, ends = self.encoder.encode(prompts, steps)
        at = [
            e if (e and every_step and self.kind == "prm") else [e[-1] if e else len(r) - 1]
            for r, e in zip(ids, ends, strict=True)
        ]
        out: list[np.ndarray] = [np.zeros(0)] * n
        # Similar lengths share a chunk, so little compute goes to padding.
        order = sorted(range(n), key=lambda i: len(ids[i]))
        for lo in range(0, n, self.batch_size):
            chunk = order[lo : lo + self.batch_size]
            x, mask = pad_right([ids[i] for i in chunk], self.tok.pad_token_id)
            width = max(len(at[i]) for i in chunk)
            pos = torch.tensor([at[i] + [at[i][-1]] * (width - len(at[i])) for i in chunk])
            x, mask, pos = x.to(self.device), mask.to(self.device), pos.to(self.device)
            if rider is None and not self.members:
                logits = step_logits(self.model, self.kind, x, mask, pos)
            else:
                logits, top_input = _with_top_input(self.model, self.kind, x, mask, pos)
                if self.members:
                    logits = self._mean_with_members(logits, top_input, x, pos)
            if rider is not None:
                ride = (
                    (rider[0].top_logits(top_input, x, pos) + rider[0].logit_offset).sigmoid().cpu().numpy()
                )
                rider[0].forward_calls += 1
                rider[1].update({i: float(ride[j, 0]) for j, i in enumerate(chunk)})
            self.forward_calls += 1
            probs = (logits + self.logit_offset).sigmoid().cpu().numpy()
            for j, i in enumerate(chunk):
                out[i] = probs[j, : len(at[i])] if self.kind == "prm" else probs[j, :1]
        return out

    def top_logits(self, top_input: dict, ids: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """This critic's logits [n, k] from another critic's input to the top block they both have
        (`_own_top_logits`, averaged with its members' where it has them)."""
        own = self._own_top_logits(top_input, ids, ends)
        return self._mean_with_members(own, top_input, ids, ends) if self.members else own

    def _mean_with_members(self, own: torch.Tensor, top_input: dict, ids, ends) -> torch.Tensor:
        total = own + sum(m._own_top_logits(top_input, ids, ends) for m in self.members)
        return total / (1 + len(self.members))

    def _own_top_logits(self, top_input: dict, ids: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """This model's own top block, final norm and head on `top_input`, then the read-out
        `step_logits` makes (the last non-pad token for value/ORM, as the model's own pooling
        picks it; `ends` for the PRM).

        A value function or ORM reads one position, so its block's MLP (two thirds of the embedded
        block's work) runs on that position alone: its output, [n, 1, d], is broadcast into the
        residual sum, which is right at the read position and never read elsewhere. Attention
        still sees every position."""
        kwargs = {k: v for k, v in top_input["kwargs"].items() if k not in ("past_key_values", "cache")}
        block, hook = self.model.model.layers[-1], None
        if self.kind in SEQ_KINDS:
            pad = self.model.config.pad_token_id
            at = ((ids != pad).int() * torch.arange(ids.shape[1], device=ids.device)).argmax(-1)
            rows = torch.arange(ids.shape[0], device=ids.device)
            if isinstance(getattr(block, "mlp", None), torch.nn.Module):
                hook = block.mlp.register_forward_pre_hook(
                    lambda _m, args: (args[0][rows, at].unsqueeze(1), *args[1:]) if args else None
                )
        try:
            out = block(*top_input["args"], **kwargs)
        finally:
            if hook is not None:
                hook.remove()
        out = out[0] if isinstance(out, tuple) else out
        if self.kind in SEQ_KINDS:
            return self.model.score(self.model.model.norm(out[rows, at])).float().view(-1, 1)
        return self.model.score(self.model.model.norm(out)).float()[..., 0].gather(1, ends)


def _with_top_input(model, kind: str, ids, mask, ends) -> tuple[torch.Tensor, dict]:
    """(`step_logits`, the positional and keyword inputs of the model's top block in that pass)."""
    seen: dict = {}

    def grab(module, args, kwargs):
        seen.update(args=args, kwargs=kwargs)

    hook = model.model.layers[-1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        return step_logits(model, kind, ids, mask, ends), seen
    finally:
        hook.remove()


def shares_trunk(a: ModelCritic, b: ModelCritic) -> bool:
    """Whether `b` can be scored from `a`'s pass: the same Llama-style stack and tokenizer, and
    bit-identical embeddings and blocks below the top one (the embedded critics fine-tune only the
    top block and the head of one frozen trunk)."""
    try:
        ma, mb = a.model.model, b.model.model
        blocks = len(ma.layers)
        if blocks != len(mb.layers) or blocks < 2 or not hasattr(b.model, "score") or not hasattr(mb, "norm"):
            return False
    except AttributeError:
        return False
    if a.tok.get_vocab() != b.tok.get_vocab() or a.device != b.device or a.batch_size != b.batch_size:
        return False
    lower = [(ma.embed_tokens, mb.embed_tokens)] + [(ma.layers[i], mb.layers[i]) for i in range(blocks - 1)]
    for x, y in lower:
        px, py = dict(x.named_parameters()), dict(y.named_parameters())
        if px.keys() != py.keys() or not all(torch.equal(px[k], py[k]) for k in px):
            return False
    rope_a, rope_b = getattr(ma, "rotary_emb", None), getattr(mb, "rotary_emb", None)
    if (rope_a is None) != (rope_b is None):
        return False
    return rope_a is None or torch.equal(rope_a.inv_freq, rope_b.inv_freq)


def check_critic_dir(path: str | Path, kind: str, task: str | None = None) -> Path:
    """Raise `CriticLoadError` (one line) unless `path` is a loadable, safe critic of `kind` (for the
    task named `task`, where its critic.json says which task's trees it learned from)."""
    from transformers import AutoConfig

    name = f"critics.{kind}_path={path}"
    p = Path(path).expanduser()
    if not str(path) or not p.is_dir():
        raise CriticLoadError(
            f"{name} does not exist: point it at a directory written by `arborist train-critics` "
            f"(or by save_pretrained), or set it to '' to turn the {kind} critic off"
        )
    if not (p / "config.json").is_file():
        raise CriticLoadError(f"{name} has no config.json: it must be a directory written by save_pretrained")
    if not any(p.glob("*.safetensors")):
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        how = "re-save it with model.save_pretrained(dir, safe_serialization=True)"
        if pickles:
            raise CriticLoadError(
                f"{name} has only pickle weights ({', '.join(pickles[:3])}), never loaded: {how}"
            )
        raise CriticLoadError(f"{name} has no *.safetensors weights: {how}")
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CriticLoadError(
            f"{name}: its config.json cannot be read ({str(e).splitlines()[0][:120]})"
        ) from None
    archs = config.architectures or []
    wanted = "ForSequenceClassification" if kind in SEQ_KINDS else "ForTokenClassification"
    if archs and not any(a.endswith(wanted) for a in archs):
        raise CriticLoadError(
            f"{name} holds a {archs[0]}, but a {kind} critic is a {CLASSES[kind]} model (*{wanted}): "
            "train one from it with `arborist train-critics DATASET --base DIR`"
        )
    if config.num_labels != 1:
        raise CriticLoadError(
            f"a {kind} critic needs num_labels=1: {p} has num_labels={config.num_labels}; train one with "
            f"`arborist train-critics`, or load the trunk with from_pretrained(dir, num_labels=1) and fine-tune it"
        )
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise CriticLoadError(
            f"{name} has no tokenizer: save it next to the model with tokenizer.save_pretrained(dir)"
        )
    meta = read_meta(p)
    if meta.get("kind") not in (None, kind):
        raise CriticLoadError(f"{name} is a {meta['kind']} critic (critic.json), not a {kind} critic")
    if task is not None and meta.get("task") not in (None, task):
        raise CriticLoadError(
            f"{name} learned from {meta['task']} trees, not {task} ones (critic.json): train critics on "
            "this task's search output with `arborist train-critics`, or search with critics=rollouts"
        )
    _check_members(p, name, kind, task, member_names(meta))
    return p


def member_names(meta: dict) -> list:
    """The members critic.json names (an ensemble's; [] for a single critic), as a list."""
    members = meta.get("members", [])
    return members if isinstance(members, list) else [members]


def _check_members(p: Path, name: str, kind: str, task: str | None, members: list) -> None:
    """An ensemble's members (`member_names`): plain sub-directories of `p` (no link out of it),
    each a loadable critic of `kind` that has no members of its own."""
    for member in members:
        where = f"{name}: critic.json names a member {member!r}"
        if not isinstance(member, str) or Path(member).name != member or member in ("", ".", ".."):
            raise CriticLoadError(
                f"{where} that is not a sub-directory of it: members must be plain directory names"
            )
        target = (p / member).resolve()
        if target == p.resolve() or not target.is_relative_to(p.resolve()):
            raise CriticLoadError(
                f"{where} that leads out of it (a link?): a member must lie inside its critic"
            )
        if not (p / member).is_dir():
            raise CriticLoadError(f"{where}, which is missing: copy the whole directory, or retrain it")
        if read_meta(p / member).get("members"):
            raise CriticLoadError(
                f"{where} that has members of its own: an ensemble's members are single critics"
            )
        try:
            check_critic_dir(p / member, kind, task)
        except CriticLoadError as e:
            reason = str(e).removeprefix(f"critics.{kind}_path={p / member}").strip(" :")
            raise CriticLoadError(
                f"{where}, which {reason}: retrain it with `arborist train-critics`"
            ) from None


def read_meta(path: str | Path) -> dict:
    """`critic.json` of a critic directory ({} when absent: a user-brought model); one line where it
    is no JSON object or its logit offset no finite number (NaN scores: the critic silently off)."""
    f = Path(path) / "critic.json"
    meta = read_json_object(f, CriticLoadError, "retrain the critic, or delete the file")
    offset = meta.get("logit_offset", 0.0)
    if isinstance(offset, bool) or not isinstance(offset, int | float) or not math.isfinite(offset):
        raise CriticLoadError(f"{f}: logit_offset={offset!r} is not a finite number: retrain the critic")
    return meta


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:  # padding is on the right and masked; any id does
        if tok.eos_token is None:
            raise CriticLoadError(
                f"{path}: the tokenizer has neither a pad nor an eos token: set one and save it"
            )
        tok.pad_token = tok.eos_token
    return tok


def load_critic(
    path: str | Path, kind: str, task: Task, device: str = "auto", dtype: str = "auto", batch_size: int = 256
) -> ModelCritic:
    """Load a critic of `kind` ("value", "prm", "orm") from a local directory, with the members
    its critic.json names (an ensemble: see the module docstring)."""
    p = check_critic_dir(path, kind, task.name)
    dev = resolve_device(device)
    tok = load_tokenizer(p)
    model = auto_class(kind).from_pretrained(
        p,
        local_files_only=True,
        use_safetensors=True,
        dtype=resolve_dtype(dtype, dev, "critics.dtype", CriticLoadError),
    )
    # Sequence classifiers pool the last non-pad token; they need to know which id pads.
    model.config.pad_token_id = tok.pad_token_id
    meta = read_meta(p)
    critic = ModelCritic(
        model.to(dev).eval(),
        tok,
        kind,
        task,
        dev,
        batch_size,
        logit_offset=float(meta.get("logit_offset", 0.0)),
    )
    for name in member_names(meta):  # checked by check_critic_dir
        member = load_critic(p / name, kind, task, device, dtype, batch_size)
        if not shares_trunk(critic, member):
            raise CriticLoadError(
                f"critics.{kind}_path={path}: its member {name} does not share its frozen trunk "
                "(embeddings and lower blocks bit-identical): retrain the ensemble with `arborist train-critics`"
            )
        critic.members.append(member)
    return critic


def init_from_policy(policy_dir: str | Path, kind: str, seed: int = 0):
    """(model, tokenizer): the policy checkpoint's trunk with a fresh one-logit head for `kind`.

    Starting from the policy is the cheap route to a good critic: its trunk already reads the
    task's text. The head is seeded, so training is reproducible.
    """
    torch.manual_seed(seed)
    tok = load_tokenizer(policy_dir)
    model = auto_class(kind).from_pretrained(
        policy_dir, num_labels=1, local_files_only=True, use_safetensors=True, dtype=torch.float32
    )
    model.config.pad_token_id = tok.pad_token_id
    model.config.problem_type = "regression"  # one logit; trained with BCE, read with sigmoid
    return model, tok


def save_critic(model, tok, kind: str, path: str | Path, meta: dict) -> Path:
    """save_pretrained (safetensors) + tokenizer + critic.json {"kind", ...meta}."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    text = json.dumps(json_safe({"kind": kind, **meta}), indent=2, allow_nan=False)
    (path / "critic.json").write_text(text + "\n")
    return path
