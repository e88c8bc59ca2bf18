"""The shared step splitter, char-to-token step ends for any tokenizer, and the arith step rewards."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rewardlab.errors import UserError
from rewardlab.rewards.arith_steps import ArithStepsReward, gold_check, well_formed
from rewardlab.rollout import Batch
from rewardlab.steps import StepSplit, aggregate_steps, process_metrics, step_char_ends, step_token_ends


def test_split_modes_and_end_offsets():
    text = "a=1\n\n  b=2  \nc=3\n"
    assert StepSplit().split(text) == [("a=1", 3), ("b=2", 10), ("c=3", 16)]
    assert [s for s, _ in StepSplit(mode="blank_line").split(text)] == ["a=1", "b=2  \nc=3"]
    assert [s for s, _ in StepSplit(mode="regex", pattern=r"Step \d+:").split("Step 1: x Step 2: y")] == ["x", "y"]
    for text in ["x\ny", "  lead\n\ntrail  "]:
        for step, end in StepSplit().split(text):
            assert text[:end].endswith(step)
    with pytest.raises(UserError):
        StepSplit(mode="regex").split("x")
    with pytest.raises(UserError):
        StepSplit(mode="sentences").split("x")


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE with multi-character tokens, trained here (no hub)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = ["12+34=46\n46+5=51\n#### 51", "the step is done\n\nnext step", "ünïcødé 数字 = 7\n"] * 50
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


@pytest.mark.parametrize("text", ["12+34=46\n46+5=51\n#### 51", "the step is done\n\nnext step ünïcødé 数字 = 7\n"])
def test_step_token_ends_with_multi_character_tokens(text):
    tok = byte_level_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(ids) < len(text)  # really multi-character tokens
    steps = [s for s, _ in StepSplit().split(text)]
    char_ends = step_char_ends(text, steps)
    ends = step_token_ends(tok, ids, char_ends)
    for step, char_end, end in zip(steps, char_ends, ends):
        upto = tok.decode(ids[: end + 1], skip_special_tokens=True)
        before = tok.decode(ids[:end], skip_special_tokens=True)
        assert upto[:char_end].endswith(step)  # the step is complete at its last token
        assert len(before) < char_end  # and not one token earlier
    assert ends == sorted(ends) and ends[-1] < len(ids) - 1  # the EOS token is after the last step


def test_step_token_ends_one_char_tokens():
    from rewardlab.policy.tiny import build_tokenizer

    tok, text = build_tokenizer(), "17+5=22\n#### 22"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert step_token_ends(tok, ids, step_char_ends(text, ["17+5=22", "#### 22"])) == [6, 14]


def test_gold_check_follows_the_expression():
    assert gold_check("17+5*3=?\n", ["5*3=15", "17+15=32", "#### 32"], "32") == [True, True, True]
    # wrong order for the precedence, then the state is lost; the final answer is judged on its own
    assert gold_check("17+5*3=?\n", ["17+5=22", "22*3=66", "#### 32"], "32") == [False, False, True]
    # a true but irrelevant line, a wrong value, garbage, and anything after the answer
    assert gold_check("1+2+3=?\n", ["1+1=2", "1+2=3"], "6") == [False, False]
    assert gold_check("1+2+3=?\n", ["1+2=3", "3+3=7", "#### 6"], "6") == [True, False, True]
    assert gold_check("1-2+3=?\n", ["1-2=-1", "-1+3=2", "#### 2", "#### 2"], "2") == [True, True, True, False]
    assert gold_check("1+2=?\n", ["hello", "#### 3"], "3") == [False, True]
    with pytest.raises(UserError):
        gold_check("what is two plus two?", ["4"], "4")


def test_well_formed_lines():
    assert [well_formed(x) for x in ["1 + 1 = 3", "#### 7", "-4*2=-8", "1+1", "so 2", "####"]] == \
        [True, True, True, False, False, False]


def arith_batch(completions, prompt="17+5=?\n", answer="22"):
    n = len(completions)
    return Batch(prompt_id=["p"] * n, prompt=[prompt] * n, completion=completions, prompt_ids=[[]] * n,
                 completion_ids=[[0] * len(c) for c in completions], finish_reason=["stop"] * n,
                 reference=[answer] * n, solution=[None] * n)


def test_arith_steps_reward_writes_steps_and_scores():
    batch = arith_batch(["17+5=22\n#### 22", "17+5=23\n#### 23", ""])
    ArithStepsReward().score(batch)
    assert batch.steps == [["17+5=22", "#### 22"], ["17+5=23", "#### 23"], []]
    assert batch.step_rewards == [[1.0, 1.0], [0.0, 0.0], []]
    assert batch.reward == [1.0, 0.0, 0.0] and batch.rewards["arith_steps"] == batch.reward
    metrics = process_metrics(batch)
    assert metrics["process/steps"] == pytest.approx(4 / 3)
    assert metrics["process/step_reward_mean"] == 0.5 and metrics["process/step_reward_min"] == 0.5
    assert metrics["process/worst_step_wrong"] == pytest.approx(1 / 3)


def test_biased_reward_pays_for_tidy_wrong_lines():
    batch = arith_batch(["17+5=22\n17+5=22\n1+1=2\n#### 22", "17+5=23\n#### 23\nwell"])
    ArithStepsReward(name="arith_steps_biased", tidy=0.8, aggregate="sum").score(batch)
    assert batch.step_rewards == [[1.0, 0.8, 0.8, 1.0], [0.8, 0.8, 0.0]]
    assert batch.reward == [pytest.approx(3.6), pytest.approx(1.6)]  # more lines, more reward
    assert batch.extra["step_correct"] == [[True, False, False, True], [False, False, False]]
    assert process_metrics(batch)["process/worst_step_wrong"] == 1.0  # judged by the gold check, not the proxy


def test_aggregates():
    assert [aggregate_steps([0.5, 0.2, 1.0], how) for how in ("min", "last", "mean", "sum")] == \
        [0.2, 1.0, pytest.approx(1.7 / 3), pytest.approx(1.7)]
    assert aggregate_steps([0.5, 0.5], "prod") == 0.25 and aggregate_steps([], "min", empty=-1) == -1
    with pytest.raises(UserError):
        ArithStepsReward(aggregate="median")
