"""State merge: the options sampled at one leaf that are the same step become one child.

`Option` is one sampled step as the policy returns it; `merge_options` clusters a leaf's options
(normalised text equal, or difflib-similar) into `MergedOption`s whose priors are the model's
merged probability mass. Pure Python: the expander calls it between the policy and the tree.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Option:
    """One sampled step.

    text:       the step without the separator (and without EOS)
    logprob:    sum of log p(token) under the unmodified model (temperature 1) over the generated
                tokens, the closing separator / EOS token included; <= 0
    num_tokens: generated tokens (separator/EOS included, padding excluded)
    ended:      the model emitted EOS: it considers the solution finished
    truncated:  hit `max_step_tokens` before a separator or EOS
    token_ids:  the generated token ids (for exact re-scoring)
    """

    text: str
    logprob: float
    num_tokens: int
    ended: bool
    truncated: bool = False
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class MergedOption:
    """Options of one leaf that are the same step after normalisation (state merge).

    text:     representative surface text (the member with the highest logprob)
    prior:    merged mass normalised over the leaf's merged options (the leaf's priors sum to 1)
    logprob:  log of the merged mass: logsumexp of the logprobs of the *distinct* surface strings
    count:    how many sampled options were merged (duplicates included)
    surfaces: the distinct surface strings merged, best first
    """

    text: str
    prior: float
    logprob: float
    count: int
    num_tokens: int
    ended: bool
    truncated: bool
    surfaces: tuple[str, ...] = field(default=())


def merge_options(
    options: list[Option], normalize: Callable[[str], str], similarity: float = 1.0
) -> list[MergedOption]:
    """State merge of one leaf's options.

    Two options merge when `normalize(a) == normalize(b)` (e.g. Countdown's "3+4=7" and "4+3=7"),
    or, when `similarity < 1`, when difflib's ratio of the normalised texts is >= `similarity`
    (greedy clustering in order of decreasing logprob, against each cluster's representative).

    Mass: a cluster's mass is the sum of exp(logprob) over its *distinct* surface strings (the
    same string sampled twice is one event of the model, counted once). Priors are the masses
    normalised over the leaf. Computed in log space, so long (tiny-probability) steps do not
    underflow. Returns clusters in order of decreasing prior.
    """
    assert 0.0 < similarity <= 1.0, f"similarity must be in (0, 1], got {similarity}"
    order = sorted(range(len(options)), key=lambda i: -options[i].logprob)
    clusters: list[dict] = []  # key, members (indices), surfaces {text: logprob}
    by_key: dict[str, dict] = {}
    for i in order:
        opt = options[i]
        key = normalize(opt.text)
        cl = by_key.get(key)
        if cl is None and similarity < 1.0:
            cl = next(
                (c for c in clusters if difflib.SequenceMatcher(None, c["key"], key).ratio() >= similarity),
                None,
            )
        if cl is None:
            cl = {"key": key, "members": [], "surfaces": {}}
            clusters.append(cl)
        by_key.setdefault(key, cl)
        cl["members"].append(i)
        cl["surfaces"].setdefault(opt.text, opt.logprob)
    masses = [_logsumexp(list(c["surfaces"].values())) for c in clusters]
    total = _logsumexp(masses) if masses else 0.0
    merged = []
    for c, lm in zip(clusters, masses, strict=True):
        rep = options[c["members"][0]]  # highest logprob: clusters were filled in that order
        merged.append(
            MergedOption(
                text=rep.text,
                prior=math.exp(lm - total),
                logprob=lm,
                count=len(c["members"]),
                num_tokens=rep.num_tokens,
                ended=rep.ended,
                truncated=rep.truncated,
                surfaces=tuple(c["surfaces"]),
            )
        )
    merged.sort(key=lambda m: -m.prior)
    return merged


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    if m == -math.inf:
        return m
    return m + math.log(sum(math.exp(x - m) for x in xs))
