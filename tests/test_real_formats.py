"""Each reward's model input on real tokenizer conventions (tests/real_tokenizers.py): chat templates applied
exactly once, by the model that reads them, BOS where its authors put it, PRM labels where they are read,
RLPR's reference tokens as they tokenize in context, conversational prompts end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from real_tokenizers import real_models  # noqa: F401  (session fixture)

from rewardlab.data.jsonl import FieldsTask
from rewardlab.data.templates import PromptTemplate
from rewardlab.errors import UserError
from rewardlab.policy import load_policy
from rewardlab.rewards.judge import JudgeModel, JudgeReward
from rewardlab.rewards.orm import ORMReward
from rewardlab.rewards.pairwise import PairwiseJudgeReward
from rewardlab.rewards.prm import QWEN_SYSTEM, PRMReward
from rewardlab.rewards.ref_likelihood import RefLikelihoodReward
from rewardlab.rollout import Batch
from rewardlab.scoring import batch_from_rows

QUESTION = "What is 17 + 5?"
COMPLETION = "17+5=22\n#### 22"


@pytest.fixture(scope="module")
def policies(real_models):  # noqa: F811
    return {name: load_policy(path=str(real_models[name]), device="cpu", log=lambda *_: None)
            for name in ("qwen_policy", "llama_policy")}


def policy_batch(policy, completions=(COMPLETION,), question=QUESTION, reference=None) -> Batch:
    """Rows as a generator writes them: the prompt rendered with the policy's template, the raw question and
    the conversation beside it."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": question}]
    prompt = PromptTemplate.render(messages, policy.tokenizer)
    encode = lambda t: policy.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    n = len(completions)
    return Batch(prompt_id=["q"] * n, prompt=[prompt] * n, completion=list(completions),
                 prompt_ids=[encode(prompt)] * n, completion_ids=[encode(c) for c in completions],
                 finish_reason=["stop"] * n, reference=[reference] * n, solution=[None] * n,
                 question=[question] * n, messages=[messages] * n)


def model_inputs(model) -> list[torch.Tensor]:
    """Every input_ids tensor the model's input embeddings receive from now on (the model's forward and the
    native engine's own prefill and steps, generation/fused_step.py, both go through them)."""
    seen: list[torch.Tensor] = []
    model.get_input_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    return seen


def texts(tokenizer, seen) -> list[str]:
    return [tokenizer.decode(row[row != tokenizer.pad_token_id]) for ids in seen for row in ids]


def test_batch_keeps_question_and_messages_through_parquet(tmp_path, policies):
    batch = policy_batch(policies["qwen_policy"], completions=("a", "b"))
    batch.save(tmp_path / "b.parquet")
    loaded = Batch.load(tmp_path / "b.parquet")
    assert loaded.question == [QUESTION] * 2 and loaded.messages == batch.messages
    assert loaded.select([1]).conversation(0) == batch.messages[1]
    plain = Batch(prompt_id=["p"], prompt=["1+1=?"], completion=["2"], prompt_ids=[[1]], completion_ids=[[2]],
                  finish_reason=["stop"], reference=[None], solution=[None])
    assert plain.raw_question(0) == "1+1=?" and plain.conversation(0) == [{"role": "user", "content": "1+1=?"}]


@pytest.mark.parametrize("policy_name, orm_name, header, bos", [
    ("llama_policy", "qwen_orm", "<|im_start|>system", None),
    ("qwen_policy", "llama_orm", "<|start_header_id|>system", "<|begin_of_text|>")])
def test_orm_renders_its_own_template_once(real_models, policies, policy_name, orm_name, header, bos):  # noqa: F811
    orm = ORMReward(model=str(real_models[orm_name]), device="cpu")
    seen = model_inputs(orm.model)
    orm.score(policy_batch(policies[policy_name]))
    (text,) = texts(orm.tokenizer, seen)
    assert text.count(header) == 1 and text.count(QUESTION) == 1 and COMPLETION in text
    assert "<|start_header_id|>" not in text if orm_name == "qwen_orm" else "<|im_start|>" not in text
    if bos:
        assert text.startswith(bos) and text.count(bos) == 1


def test_qwen_prm_renders_its_own_template_from_the_raw_question(real_models, policies):  # noqa: F811
    prm = PRMReward(model=str(real_models["qwen_prm"]), device="cpu")
    assert prm.format == "qwen_prm"
    seen = model_inputs(prm.model)
    batch = policy_batch(policies["llama_policy"])
    prm.score(batch)
    (text,) = texts(prm.tokenizer, seen)
    assert text == (f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
                    "<|im_start|>assistant\n17+5=22<extra_0>#### 22<extra_0><|im_end|>\n")
    ids, positions = prm._encode(QUESTION, batch.steps[0])
    assert [prm.tokenizer.convert_ids_to_tokens(ids[p]) for p in positions] == ["<extra_0>"] * 2


def test_math_shepherd_input_has_bos_once_and_scores_at_the_tags(real_models, policies):  # noqa: F811
    prm = PRMReward(model=str(real_models["shepherd"]), device="cpu", format="math_shepherd")
    tok = prm.tokenizer
    ids, positions = prm._encode(QUESTION, ["17+5=22", "#### 22"])
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids == tok.encode(f"{QUESTION} 17+5=22 ки\n#### 22 ки\n")  # the reference code's encode, BOS added
    assert len(positions) == 2 and all(ids[p] == prm.tag_id for p in positions)
    assert tok.decode(ids[: positions[0] + 1]).endswith("17+5=22 ки")
    batch = policy_batch(policies["qwen_policy"])
    prm.score(batch)
    assert len(batch.step_rewards[0]) == 2 and "<|im_start|>" not in tok.decode(ids)


def test_token_classification_scores_where_trl_puts_the_label(real_models):  # noqa: F811
    """TRL PRMTrainer.tokenize_row: [BOS] + prompt + each step followed by the separator "\\n", the label on the
    separator's last token; scoring must read exactly those positions."""
    prm = PRMReward(model=str(real_models["trl_prm"]), device="cpu")
    assert prm.format == "token_classification"
    tok = prm.tokenizer
    steps = ["17+5=22", "#### 22"]
    encode = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    completions = [encode(s) + encode("\n") for s in steps]
    labels = [[-100] * (len(c) - 1) + [1] for c in completions]
    trl_ids = [tok.bos_token_id] + encode(QUESTION) + completions[0] + completions[1]
    trl_labels = [-100] * (1 + len(encode(QUESTION))) + labels[0] + labels[1]
    ids, positions = prm._encode(QUESTION, steps)
    assert ids == trl_ids and ids.count(tok.bos_token_id) == 1
    assert positions == [i for i, label in enumerate(trl_labels) if label != -100]
    with torch.no_grad():
        logits = prm.model(input_ids=torch.tensor([ids])).logits[0, positions]
    batch = Batch(prompt_id=["q"], prompt=["<rendered>"], completion=["17+5=22\n#### 22"], prompt_ids=[[0]],
                  completion_ids=[[0]], finish_reason=["stop"], reference=[None], solution=[None], question=[QUESTION])
    prm.score(batch)
    assert batch.step_rewards[0] == pytest.approx(logits.softmax(-1)[:, 1].tolist(), abs=1e-6)


def test_signed_scale_is_two_p_minus_one(real_models):  # noqa: F811
    batch = lambda: Batch(prompt_id=["q"], prompt=[QUESTION], completion=[COMPLETION], prompt_ids=[[0]],  # noqa: E731
                          completion_ids=[[0]], finish_reason=["stop"], reference=[None], solution=[None])
    prob, signed = batch(), batch()
    PRMReward(model=str(real_models["qwen_prm"]), device="cpu", aggregate="min").score(prob)
    PRMReward(model=str(real_models["qwen_prm"]), device="cpu", aggregate="min", scale="signed").score(signed)
    assert signed.step_rewards[0] == pytest.approx([2 * p - 1 for p in prob.step_rewards[0]])
    assert signed.reward[0] == pytest.approx(2 * prob.reward[0] - 1)
    assert signed.extra["prm/step_scores"] == prob.step_rewards  # the model's probabilities stay readable
    with pytest.raises(UserError, match="reward.scale"):
        PRMReward(model=str(real_models["qwen_prm"]), device="cpu", scale="logit")


def test_algo_pure_defaults_prm_scale_to_signed():
    from hydra import compose, initialize_config_module

    from rewardlab.config import register_schemas

    register_schemas()
    with initialize_config_module(config_module="rewardlab.conf", version_base="1.3"):
        scale = lambda *o: compose(config_name="train", overrides=list(o)).reward  # noqa: E731
        assert scale("algo=pure", "reward=prm").scale == "signed"
        assert scale("algo=pure", "reward=composite").components.prm.reward.scale == "signed"
        assert scale("algo=grpo", "reward=prm").scale == "prob"
        assert scale("algo=pure", "reward=prm", "reward.scale=prob").scale == "prob"
        assert compose(config_name="score", overrides=["reward=prm"]).reward.scale == "prob"
    from rewardlab.algos.pg import PolicyGradient

    with pytest.raises(UserError, match="algo.prm_scale"):
        PolicyGradient(prm_scale="logit")


@pytest.mark.parametrize("kind", ["judge", "pairwise"])
def test_judge_queries_go_through_the_judge_models_template_once(policies, kind):
    policy = policies["llama_policy"]
    spec = JudgeModel(samples=1, temperature=0, max_new_tokens=2)
    reward = JudgeReward(judge=spec) if kind == "judge" else PairwiseJudgeReward(judge=spec)
    reward.bind(policy)
    seen = model_inputs(policy.model)
    batch = policy_batch(policies["qwen_policy"], completions=("17+5=22\n#### 22", "#### 21"))
    with pytest.raises(UserError, match="none of the"):  # a random model writes no verdict
        reward.score(batch)
    prefill = texts(policy.tokenizer, seen[:1])
    assert len(prefill) == 2 and reward.stats["judge/truncated_rate"] == 0
    for text in prefill:
        assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
        assert text.count("<|begin_of_text|>") == 1 and text.count("<|start_header_id|>user") == 1
        assert f"{QUESTION}\n" in text and "<|im_start|>" not in text  # the raw question, not the Qwen prompt
        assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_ref_likelihood_scores_the_reference_as_it_tokenizes_in_context(policies):
    policy = policies["qwen_policy"]
    tok = policy.tokenizer
    reward = RefLikelihoodReward()
    reward.bind(policy)
    context, target = reward.split(tok, "17+5=22\n#### ", "Paris")
    assert tok.convert_ids_to_tokens(target) == ["ĠParis"]  # one token with its space, as the model writes it
    assert context + target == tok.encode("17+5=22\n#### Paris", add_special_tokens=False)
    batch = policy_batch(policy, completions=("17+5=22\n#### 21",), reference="Paris")
    (score,) = reward.compute(batch)
    ids = batch.prompt_ids[0] + context + target
    with torch.no_grad():
        probs = policy.model(input_ids=torch.tensor([ids])).logits[0, -2].softmax(-1)
    assert score == pytest.approx(float(probs[target[0]]), rel=1e-5)


def test_conversational_rows_are_rendered_once_with_the_policy_template(tmp_path, policies):
    tok = policies["qwen_policy"].tokenizer
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"prompt": conversation, "answer": "22"}) + "\n" for _ in range(3)))
    task = FieldsTask(path=str(path), test_size=1)
    task.prepare(tok)
    (example,) = task.test_examples()
    assert example.prompt == tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert example.prompt.count("<|im_start|>system") == 1 and example.question == QUESTION
    assert example.messages == conversation
    llama = policies["llama_policy"].tokenizer
    ids = llama(PromptTemplate.render(conversation, llama), add_special_tokens=False)["input_ids"]  # as generators do
    assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1
    batch = batch_from_rows([{"prompt": conversation, "completion": "22"}, {"prompt": "1+1=?", "completion": "2"}], tok)
    assert batch.prompt[0] == example.prompt and batch.prompt[1] == "1+1=?"  # a plain prompt is taken as raw
    assert batch.question == [QUESTION, "1+1=?"] and batch.messages == [conversation, None]
    path.write_text(json.dumps({"prompt": [{"role": "user"}], "answer": "1"}) + "\n")
    with pytest.raises(UserError, match="chat messages"):
        FieldsTask(path=str(path), test_size=1)


def test_train_on_conversational_jsonl_with_a_qwen2_policy(tmp_path, real_models):  # noqa: F811
    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + 5?"}], "answer": str(a + 5)} for a in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    result = run_cli("train", f"policy.path={real_models['qwen_policy']}", "dataset=jsonl", f"dataset.path={data}",
                     "dataset.test_size=2", "reward=orm", f"reward.model={real_models['qwen_orm']}", "logger=none",
                     "run.iterations=2", "run.eval_every=2", "run.eval_size=2", "run.prompts_per_iteration=2",
                     "algo.samples_per_prompt=2", "generation.sampling.max_new_tokens=4", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-2000:]
    batch = Batch.load(sorted((run / "rollouts").glob("iter_*.parquet"))[-1])
    assert all(p.count("<|im_start|>system") == 1 and p.endswith("<|im_start|>assistant\n") for p in batch.prompt)
    assert all(q.startswith("What is") and m[-1]["content"] == q for q, m in zip(batch.question, batch.messages))
    assert all(r == r for r in batch.rewards["orm"])  # finite ORM scores
