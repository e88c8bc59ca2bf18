"""The judging tiny policy (policy=tiny_judge): its labels follow the exact checker, its prompts are the ones the
reward configs send, its base ids are the tiny policy's, and the model it builds judges with real skill."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from rewardlab.config import register_schemas
from rewardlab.policy.tiny import CHARS, SPECIALS, TinyBuild, build_tokenizer
from rewardlab.policy.tiny_judge import (JUDGE_CHARS, JUDGE_TOKENS, TINY_JUDGE_TEMPLATE, TINY_PAIRWISE_TEMPLATE,
                                         comparison_rows, judge_score, judging_rows, pairwise_rationale,
                                         pointwise_rationale, said, verdict)


@pytest.mark.parametrize("completion, score", [
    ("7+0=7\n7+5=12\n#### 12", 5),
    ("7+0=8\n8+5=12\n#### 12", 5),  # the grader reads the final answer only
    ("7+0=7\n7+5=13\n#### 13", 1),
    ("13", 1),  # a wrong bare answer
    ("", 0),  # no answer
])
def test_pointwise_label_follows_the_grader(completion, score):
    assert judge_score(completion, "12") == score


def test_the_rationale_checks_the_answer_by_subtracting_it_from_the_judges_own():
    assert said("1+2=3\n#### 3") == "3" and said("") == "none"
    assert pointwise_rationale("86", "87") == "86-87=-1\nScore: 1"
    assert pointwise_rationale("86", "86") == "86-86=0\nScore: 5"
    assert pointwise_rationale("86", "none") == "no answer\nScore: 0"
    assert pairwise_rationale("86", "86", "96") == "86-86=0\n86-96=-10\n[[A]]"
    assert pairwise_rationale("86", "85", "none") == "86-85=1\nno answer\n[[C]]"


@pytest.mark.parametrize("completion", ["#### 12", "#### 012", "#### 12.0", "#### 13", "13", "12", ""])
def test_the_rationales_verdict_is_the_graders_label(completion):
    """A judging row's score is what judge_score (the grader) gives the same completion, whatever its format."""
    assert pointwise_rationale("12", said(completion)).endswith(f"Score: {judge_score(completion, '12')}")


def test_pairwise_label_names_the_right_one_or_a_tie():
    assert [verdict(True, False), verdict(False, True), verdict(True, True), verdict(False, False)] == \
        ["[[A]]", "[[B]]", "[[C]]", "[[C]]"]


def test_judging_rows_render_the_reward_templates_and_label_every_ordered_pair():
    import random

    from rewardlab.data.base import Example

    tokenizer = build_tokenizer(extra=JUDGE_CHARS)
    right, wrong, also_wrong = "7+0=7\n7+5=12\n#### 12", "7+0=7\n7+5=13\n#### 13", "7+0=6\n6+5=11\n#### 11"
    ex = Example(id="0", prompt="7+0+5=?\n", answer="12", solution=right)
    point, pair = judging_rows(tokenizer, [ex], [[right, wrong, also_wrong]], random.Random(0))
    # the judge writes its own solution first, then the verdict
    assert sorted(point) == sorted([
        (TINY_JUDGE_TEMPLATE.format(prompt=ex.prompt, response=right), right + "\n12-12=0\nScore: 5"),
        (TINY_JUDGE_TEMPLATE.format(prompt=ex.prompt, response=wrong), right + "\n12-13=-1\nScore: 1"),
        (TINY_JUDGE_TEMPLATE.format(prompt=ex.prompt, response=also_wrong), right + "\n12-11=1\nScore: 1")])
    # 4 ordered pairs with exactly one right answer, and as many of the 2 ties as there are: both
    verdicts = sorted(label.rsplit("\n", 1)[1] for _, label in pair)
    assert verdicts == ["[[A]]", "[[A]]", "[[B]]", "[[B]]", "[[C]]", "[[C]]"]
    assert (TINY_PAIRWISE_TEMPLATE.format(prompt=ex.prompt, first=right, second=wrong),
            right + "\n12-12=0\n12-13=-1\n[[A]]") in pair
    # every character of the rows is one token of the extended vocabulary (no <unk>)
    for query, answer in point + pair:
        assert tokenizer.unk_token_id not in tokenizer(query + answer, add_special_tokens=False)["input_ids"]


def test_comparison_rows_are_the_rationales_last_lines_with_consistent_verdicts():
    import random

    rows = comparison_rows(random.Random(0), 400, context=["1+2=3\n#### 3"])
    assert any(p.startswith("1+2=3\n#### 3\n") for p, _ in rows) and any(p[0].isdigit() and "#" not in p for p, _ in rows)
    for prompt, answer in rows:
        text = prompt.removeprefix("1+2=3\n#### 3\n") + answer
        lines = text.split("\n")
        if all(line == "no answer" for line in lines[:-1]):  # nothing to subtract
            assert text in ("no answer\nScore: 0", "no answer\nno answer\n[[C]]")
            continue
        own = next(line.split("-")[0] for line in lines if "-" in line and "=" in line)
        quoted = ["none" if line == "no answer" else line.split("-", 1)[1].split("=")[0] for line in lines[:-1]]
        if len(quoted) == 1:
            assert pointwise_rationale(own, quoted[0]) == text
        else:
            assert pairwise_rationale(own, *quoted) == text


def test_reward_configs_send_the_templates_the_judge_was_trained_on():
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rewardlab.conf", version_base="1.3"):
        point = compose(config_name="train", overrides=["experiment=self_rewarding"])
        pair = compose(config_name="train", overrides=["experiment=pref_grpo"])
    assert point.reward.template == TINY_JUDGE_TEMPLATE and point.reward.fallback is None
    assert pair.reward.template == TINY_PAIRWISE_TEMPLATE and pair.reward.fallback is None
    assert point.policy.tiny.judge and pair.policy.tiny.judge
    assert point.reward.judge.max_new_tokens == pair.reward.judge.max_new_tokens == JUDGE_TOKENS


def test_the_extended_vocabulary_keeps_the_tiny_policys_ids_and_cache_key():
    base, extended = build_tokenizer(), build_tokenizer(extra=JUDGE_CHARS)
    assert all(extended.convert_tokens_to_ids(t) == base.convert_tokens_to_ids(t) for t in SPECIALS + CHARS)
    assert len(extended) == len(base) + len(JUDGE_CHARS)
    assert TinyBuild().key() == TinyBuild(judge_steps=1).key() != TinyBuild(judge=True).key()


@pytest.mark.slow
def test_the_built_judge_parses_and_beats_the_majority_class_on_held_out_problems(tiny_judge_policy):
    """Measured at build time on samples of problems the judging rows never saw."""
    skill = json.loads((Path(tiny_judge_policy.source) / "rewardlab_build.json").read_text())["judge_skill"]
    assert skill["point_parse_rate"] >= 0.95 and skill["pair_parse_rate"] >= 0.95
    assert skill["point_agreement"] > skill["point_majority_share"] + 0.05
    # pairwise: 0.73-0.90 on the two solving models it was measured on (tiny_judge.py); the previous recipe's 0.48 on
    # one of them (chance, on 708 decisive pairs) fails here
    assert 0.65 <= skill["pair_agreement"] <= 1.0


def test_builds_run_on_a_fixed_thread_count_and_give_the_caller_its_threads_back(tmp_path, monkeypatch):
    """A run with run.threads=1 that builds a tiny model (policy, judge, PRM: all go through cached_build) builds it
    on BUILD_THREADS threads (the model a fresh machine's first `make train` builds, whatever its core count), then
    runs on its one thread."""
    import torch

    from rewardlab.policy.tiny import BUILD_THREADS, cached_build

    monkeypatch.setenv("REWARDLAB_CACHE", str(tmp_path))
    seen = []

    def build(tmp):
        seen.append(torch.get_num_threads())
        (tmp / "config.json").write_text("{}")

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cached_build("tiny-x", build, log=lambda m: None) == tmp_path / "tiny-x"
        assert seen == [BUILD_THREADS] == [2] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_micro_batches_of_similar_length_rows_give_the_whole_batchs_step():
    """The judge build's micro-batches (rows of similar length, their gradients added up) give the gradient of one
    padded batch of all the rows, up to float order, and use every row once."""
    import random

    import torch

    from rewardlab.policy.tiny import build_model, micro_batches, supervised

    rows = [(list(range(n)), [0] * 2 + [1] * (n - 2)) for n in (9, 3, 30, 4, 17, 30)]
    groups = micro_batches(rows, 60)
    assert sorted(map(id, (r for g in groups for r in g))) == sorted(map(id, rows))
    assert all(len(g[0][0]) * len(g) <= 60 or len(g) == 1 for g in groups)
    assert [len(r[0]) for g in groups for r in g] == [30, 30, 17, 9, 4, 3] and len(groups) == 3
    assert micro_batches(rows, None) == [rows]

    tokenizer = build_tokenizer()
    texts = [(f"{a}+{b}=", f"{a + b}" + "0" * (a % 7)) for a, b in zip(range(10, 30), range(40, 60))]

    def gradient(batch_tokens):  # the gradient of one step is left on the parameters
        torch.manual_seed(0)
        model = build_model(TinyBuild(), tokenizer)
        rng = random.Random(0)
        supervised(model, tokenizer, lambda: rng.sample(texts, 12), 1, 1e-3, log=lambda m: None,
                   batch_tokens=batch_tokens)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole, micro = gradient(None), gradient(40)
    assert not torch.equal(whole, micro)  # really ran in several micro-batches (a different float order)
    assert whole.abs().max() > 1e-3 and torch.allclose(whole, micro, atol=1e-7, rtol=1e-4)


def test_the_tiny_prm_keeps_its_cache_key_and_thread_count_whatever_the_judge_settings(tmp_path, monkeypatch):
    """The tiny PRM trains on a solving-only policy, so the judge settings of its policy spec do not change its key (a
    new judge recipe does not rebuild a user's PRM); its build runs on PRM_BUILD_THREADS, the count the documented
    tiny PRM was built on (a 2-thread build gives other weights)."""
    import torch

    import rewardlab.rewards.tiny_prm as tiny_prm
    from rewardlab.rewards.tiny_prm import PRM_BUILD_THREADS, TinyPRMBuild

    assert TinyPRMBuild().key() == TinyPRMBuild(policy=TinyBuild(judge_steps=1, judge_batch_tokens=1)).key()
    assert TinyPRMBuild().key() != TinyPRMBuild(policy=TinyBuild(warmup_steps=1)).key()
    assert TinyPRMBuild().key() == "e39c19dba61c"  # the documented PRM's key since before the judge existed
    monkeypatch.setenv("REWARDLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(tiny_prm, "ensure_tiny", lambda spec, log: tmp_path)  # no policy build: only the threads
    seen = []

    def training_rows(spec, policy_dir):
        seen.append(torch.get_num_threads())
        raise RuntimeError("stop")

    monkeypatch.setattr(tiny_prm, "training_rows", training_rows)
    with pytest.raises(RuntimeError, match="stop"):
        tiny_prm.ensure_tiny_prm(TinyPRMBuild(), log=lambda m: None)
    assert seen == [PRM_BUILD_THREADS] == [1]
