"""Local model directories: the checks a policy directory must pass before anything loads it
(safetensors only, a language-model head, a tokenizer), its tokenizer, and the device and dtype
settings as torch objects. Nothing is downloaded: every load passes `local_files_only=True`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mcts.base import DTYPE_NAMES


class PolicyLoadError(ValueError):
    """The policy directory cannot be loaded; the message is one line saying how to fix it."""


# Heads that write no tokens; a bare "...Model" has none either (unless auto_map says: ChatGLM's).
NOT_GENERATIVE = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


def check_policy_dir(path: str | Path) -> Path:
    """Raise `PolicyLoadError` unless `path` looks like a loadable, safe local checkpoint."""
    p = Path(path).expanduser()
    if str(path) and p.is_file():
        raise PolicyLoadError(
            f"policy.path={path} is a file: point policy.path at the directory save_pretrained wrote"
        )
    if not str(path) or not p.is_dir():
        raise PolicyLoadError(
            f"policy.path={path} does not exist: point policy.path at a local directory saved with "
            "save_pretrained"
        )
    if not (p / "config.json").is_file():
        raise PolicyLoadError(
            f"policy.path={path} has no config.json: it must be a directory written by "
            "model.save_pretrained(dir) (and tokenizer.save_pretrained(dir))"
        )
    if not any(p.glob("*.safetensors")):
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise PolicyLoadError(
                f"policy.path={path} has only pickle weights ({', '.join(pickles[:3])}), which arborist "
                "never loads: re-save with model.save_pretrained(dir, safe_serialization=True)"
            )
        raise PolicyLoadError(
            f"policy.path={path} has no *.safetensors weights: save the model with "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PolicyLoadError(
            f"policy.path={path}: its config.json is not valid JSON ({e}): re-save the model"
        ) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise PolicyLoadError(f"policy.path={path}: its config.json names no model_type: re-save the model")
    heads = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    bare = [a.endswith(NOT_GENERATIVE) or a.endswith("Model") and "LMHead" not in a for a in heads]
    if heads and all(bare) and "AutoModelForCausalLM" not in (config.get("auto_map") or {}):
        why = f"holds a {heads[0]}, which has no language-model head (a critic? an encoder?)"
        raise PolicyLoadError(f"policy.path={path} {why}: point it at a *ForCausalLM checkpoint")
    tok_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((p / f).is_file() for f in tok_files):
        raise PolicyLoadError(
            f"policy.path={path} has no tokenizer: save it next to the model with "
            "tokenizer.save_pretrained(dir)"
        )
    return p


def load_policy_tokenizer(path: str | Path, trust_remote_code: bool, key: str = "policy.path"):
    """The tokenizer of the local model directory `path` (`key` names the setting), or a one-line
    `PolicyLoadError` (ImportError: a library the tokenizer needs is not installed)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            Path(path).expanduser(), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, ImportError) as e:
        why, fix = str(e).splitlines()[0][:120], "save it with tokenizer.save_pretrained(dir)"
        raise PolicyLoadError(f"{key}={path}: the tokenizer does not load ({why}): {fix}") from None


_DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16), strict=True))


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda if available, else cpu; anything else is passed to `torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(
    dtype: str, device: torch.device, key: str = "policy.dtype", error: type[ValueError] = PolicyLoadError
) -> torch.dtype:
    """ "auto" -> bfloat16 on a GPU that supports it (else float16), float32 on CPU; an unknown name
    raises `error` naming the setting `key`."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise error(f"{key}={dtype} is not supported: use auto, float32, bfloat16 or float16")
    return _DTYPES[dtype]
