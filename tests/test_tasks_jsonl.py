"""jsonl (GSM8K-style) task: answers, `####` extraction, exact numbers, file errors; the registry."""

from __future__ import annotations

import json
import time
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcts.tasks import TASKS, CountdownDifficulty, CountdownTask, JsonlTask, StepCheck, Task, TaskInputError
from mcts.tasks.jsonl import load_jsonl_file, make_problem, parse_number
from mcts.tasks.registry import GENERATED_PROBLEMS, load_problems, make_task

TASK = JsonlTask(max_steps=4)
GSM = make_problem("g", "Ann has 40 apples and buys 2. How many?", "She has 40 + 2 = 42 apples.\n#### 42")
OK = StepCheck(terminal=True, success=True)
FAIL = StepCheck(terminal=True, success=False)
GOING = StepCheck(terminal=False, success=None)


def test_formats_and_extraction():
    assert isinstance(TASK, Task) and (TASK.name, TASK.step_separator) == ("jsonl", "\n")
    assert TASK.prompt(GSM) == "Question: Ann has 40 apples and buys 2. How many?\nAnswer:\n"
    assert GSM.answer == "42"
    assert GSM.meta == {"answer_value": "42", "solution": "She has 40 + 2 = 42 apples."}
    assert make_problem("n", "q", 7).answer == "7"
    assert make_problem("f", "q", 0.1).meta["answer_value"] == "1/10"  # exact decimal, not binary float
    assert make_problem("e", "q", 1e20).answer == "100000000000000000000"
    assert make_problem("m", "q", "a #### b #### 5").meta["solution"] == "a #### b"  # last #### counts


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (["40 + 2 = 42", "#### 42"], OK),
        (["#### 42"], OK),
        (["  ####42  "], OK),
        (["#### 42."], OK),  # end-of-sentence period
        (["#### 42.0"], OK),
        (["#### $42"], OK),
        (["#### 84/2"], OK),
        (["#### 41"], FAIL),
        (["#### forty-two"], FAIL),
        (["#### 42 apples"], FAIL),  # units are not part of a checked answer
        (["####"], FAIL),
        (["the answer is 42"], GOING),
        (["a", "b", "c"], GOING),
        (["a", "b", "c", "d"], FAIL),  # max_steps lines without an answer
        (["a", "b", "c", "d", "#### 42"], FAIL),  # an answer after max_steps does not count
        (["#### 41", "#### 42"], FAIL),  # the first answer line is the answer
        (["#### 42", "junk"], OK),
    ],
)
def test_check(steps, expected):
    assert TASK.check(GSM, steps) == expected
    assert TASK.verify(GSM, steps) is (expected.success is True)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,234", Fraction(1234)),
        ("$5.50", Fraction(11, 2)),
        ("-3/4", Fraction(-3, 4)),
        ("6/8", Fraction(3, 4)),
        (".5", Fraction(1, 2)),
        (" 7. ", Fraction(7)),
        ("3/0", None),
        ("1e5", None),  # no exponents: not how answers are written
        ("1_000", None),
        ("٤٢", None),  # non-ASCII digits
        ("nan", None),
        ("9" * 100000, None),
        ("", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_fraction_reference():
    p = make_problem("q", "What is 3/4 of 1?", "3/4")
    assert TASK.verify(p, ["#### 0.75"]) and TASK.verify(p, ["#### 6/8"]) and not TASK.verify(p, ["#### 0.7"])


def test_normalize_step():
    assert TASK.normalize_step("  So  X =\t4 ") == TASK.normalize_step("so x = 4") == "so x = 4"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=60) | st.from_regex(r"\s*####\s*[-$\d,./ ]{0,30}"), max_size=6))
def test_check_fuzz(steps):
    start = time.perf_counter()
    result = TASK.check(GSM, steps)
    TASK.normalize_step(steps[-1] if steps else "")
    assert time.perf_counter() - start < 0.05
    assert isinstance(result, StepCheck) and result.terminal == (result.success is not None)


@pytest.mark.parametrize(
    "text", ["__import__('os').system('x')", "#### " + "9" * 100000, "#### " + " " * 100000 + "42"]
)
def test_hostile_steps(text):
    start = time.perf_counter()
    assert TASK.check(GSM, [text]).success is not True
    assert time.perf_counter() - start < 0.05


# --- files ---------------------------------------------------------------------------------------


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_jsonl_and_parquet(tmp_path):
    rows = [
        {"id": "a", "question": "1+1?", "answer": "1 + 1 = 2\n#### 2"},
        {"id": "b", "question": "half?", "answer": 0.5},
        {"question": "no id?", "answer": 3},  # GSM8K files have no id column
    ]
    problems = load_jsonl_file(_write(tmp_path / "gsm.jsonl", rows))
    assert [p.id for p in problems] == ["a", "b", "gsm-3"]
    assert [p.answer for p in problems] == ["2", "0.5", "3"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{**r, "answer": str(r["answer"])} for r in rows[:2]]), tmp_path / "g.parquet"
    )
    assert load_jsonl_file(tmp_path / "g.parquet") == problems[:2]


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"id": "x", "answer": 3}, "'question' must be a non-empty string"),
        ({"id": "x", "question": "  ", "answer": 3}, "'question' must be a non-empty string"),
        ({"id": "x", "question": "q"}, "'answer' is missing"),
        ({"id": "x", "question": "q", "answer": "#### lots"}, "the text after '####' must be a number"),
        ({"id": "x", "question": "q", "answer": "forty"}, "must be a number"),
        ({"id": "x", "question": "q", "answer": [1]}, "answer must be a number or a string"),
        ({"id": "x", "question": "q", "answer": True}, "answer must be a number or a string"),
        ({"id": "a", "question": "q", "answer": 1}, "duplicate id"),
        ({"id": 1.5, "question": "q", "answer": 1}, "'id' must be"),
        ("oops", "not valid JSON"),
    ],
)
def test_load_errors_name_file_and_line(tmp_path, bad_row, message):
    path = _write(tmp_path / "gsm.jsonl", [{"id": "a", "question": "q", "answer": 1}, bad_row])
    with pytest.raises(TaskInputError, match=message) as info:
        load_jsonl_file(path)
    assert str(info.value).startswith("gsm.jsonl line 2: ") and "\n" not in str(info.value)


# --- registry ------------------------------------------------------------------------------------


def test_registry_make_task():
    assert set(TASKS) == {"countdown", "jsonl"}
    assert isinstance(make_task("countdown"), CountdownTask)
    task = make_task("jsonl", max_steps=7, path="ignored.jsonl", num_problems=3, name="jsonl")
    assert isinstance(task, JsonlTask) and task.max_steps == 7
    with pytest.raises(
        TaskInputError, match=r"^unknown task 'foo': choose one of countdown, jsonl \(task=countdown\)$"
    ):
        make_task("foo")
    with pytest.raises(TaskInputError, match="has no setting maxsteps: its settings are max_steps"):
        make_task("jsonl", maxsteps=3)
    with pytest.raises(TaskInputError, match="max_steps must be >= 1"):
        make_task("jsonl", max_steps=0)


def test_registry_load_problems(tmp_path):
    generated = load_problems("countdown", num_problems=5, seed=3, max_numbers=5, min_numbers=5)
    assert [p.id for p in generated] == [f"cd-3-{i}" for i in range(5)]
    assert all(len(p.meta["numbers"]) == 5 for p in generated)
    same = load_problems("countdown", num_problems=5, seed=3, difficulty=CountdownDifficulty(5, 5))
    assert same == generated and [p.meta for p in same] == [p.meta for p in generated]
    assert len(load_problems("countdown")) == GENERATED_PROBLEMS
    assert (
        load_problems("countdown", num_problems=2, difficulty={"max_number": 20}, max_steps=9)[0].id
        == "cd-0-0"
    )

    path = _write(tmp_path / "cd.jsonl", [{"id": i, "numbers": [2, 3], "target": 6} for i in range(4)])
    assert [p.id for p in load_problems("countdown", path=path, num_problems=2)] == ["0", "1"]
    gsm = _write(tmp_path / "g.jsonl", [{"id": "a", "question": "q", "answer": 1}])
    assert load_problems("jsonl", path=str(gsm))[0].answer == "1"

    with pytest.raises(TaskInputError, match="set task.path=FILE"):
        load_problems("jsonl")
    with pytest.raises(TaskInputError, match="unknown task 'foo'"):
        load_problems("foo")
    with pytest.raises(TaskInputError, match="countdown has no setting max_numbr"):
        load_problems("countdown", max_numbr=3)
    with pytest.raises(TaskInputError, match="does not exist"):
        load_problems("jsonl", path=tmp_path / "nope.jsonl")


def test_paragraph_steps_from_a_command_line():
    """`task.step_separator='\\n\\n'` as a shell passes it (backslash, n, twice): the config reads
    the escapes once, the task takes paragraph steps, and an answer on any line of a step counts."""
    from rewards.config import compose
    from rewards.driver import task_kwargs
    from rewards.pipeline import to_schema

    conf = to_schema(compose(["task=jsonl", "task.path=p.jsonl", "task.step_separator='\\n\\n'"]))
    assert task_kwargs(conf) == {"step_separator": "\n\n", "max_steps": 16}
    assert task_kwargs(to_schema(compose(["task=jsonl", "task.step_separator='a\\\\nb'"]))) == {
        "step_separator": "a\\nb",  # an escaped backslash stays one
        "max_steps": 16,
    }
    assert task_kwargs(to_schema(compose([]))) == {}, "countdown takes no task settings"
    task = make_task("jsonl", **task_kwargs(conf))
    assert task.step_separator == "\n\n"
    assert task.check(GSM, ["40 + 2 = 42.\nSo she has 42."]) == GOING
    assert task.check(GSM, ["40 + 2 = 42.", "So:\n#### 42"]) == OK
    assert task.check(GSM, ["#### 41\n#### 42"]) == FAIL  # the first answer line is the answer
    assert make_task("jsonl", step_separator="\\n").step_separator == "\\n", (
        "the task itself reads no escapes"
    )
    for bad in ("", " #### "):
        with pytest.raises(TaskInputError, match="step_separator=.* must be non-empty text without '####'"):
            make_task("jsonl", step_separator=bad)


def test_a_policy_that_cannot_read_the_task_is_named_before_the_search(tmp_path, caplog):
    """The embedded Countdown model reads a word problem's letters as its unknown token: the job
    says so before it searches (a warning: a real tokenizer may lack a rare character); a model
    whose tokenizer writes every byte passes without one."""
    import logging

    from rewards.config import compose
    from rewards.pipeline import check_config, warn_unreadable_prompts

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "Tom has 3 apples?", "answer": 3}) + "\n")
    base = ["task=jsonl", f"task.path={path}", f"out={tmp_path / 'out'}"]
    with caplog.at_level(logging.WARNING, logger="arborist"):
        warn_unreadable_prompts(check_config(compose(base)))
    warned = [r.getMessage() for r in caplog.records if "unknown token" in r.getMessage()]
    assert len(warned) == 1 and "the embedded policy" in warned[0] and "T" in warned[0]
    caplog.clear()
    model = _byte_level_llama(tmp_path / "bytes")
    with caplog.at_level(logging.WARNING, logger="arborist"):
        warn_unreadable_prompts(check_config(compose([*base, "policy=hf", f"policy.path={model}"])))
    assert not [r for r in caplog.records if "unknown token" in r.getMessage()]


def _byte_level_llama(path: Path) -> Path:
    """A random tiny Llama whose tokenizer writes every byte (GPT-2's byte-level BPE), and has an
    unknown token it never needs: the check looks at the characters, not at the token's absence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from mcts.charlm import save_model_dir, tiny_llama_config

    core = Tokenizer(models.BPE())
    core.pre_tokenizer, core.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], initial_alphabet=alphabet
    )
    core.train_from_iterator(["Question: 3 apples?\nAnswer:\n"], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    assert tok.unk_token_id is not None
    model = LlamaForCausalLM(tiny_llama_config(len(tok), 32, 2, n_heads=2, tok=tok))
    return save_model_dir(model.eval(), tok, path)
