"""`rewardlab train-rm`: PRM and ORM training end to end on the tiny backbone, the saved models loading and
scoring through the reward group (at the positions training labelled), held-out metrics by hand, bad input."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from rewardlab.errors import UserError
from rewardlab.rmlab.rm_data import split_by_prompt
from rewardlab.rmlab.orm_training import ORMTraining
from rewardlab.rmlab.train import PRMTraining, process_metrics
from tests.conftest import read_metrics, run_cli
from tests.reward_fixtures import make_batch

FAST = ("logger=none", "run.threads=1", "run.device=cpu", "rm.eval_fraction=0.25", "rm.batch_size=8")


def arith_lines(rng: random.Random) -> list[str]:
    a, b = rng.randint(1, 49), rng.randint(1, 49)
    return [f"{a}+{b}={a + b}", f"#### {a + b}"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stepwise_rows(count: int) -> list[dict]:
    """A rule a few steps of training learn: a step is wrong exactly when it ends with '?'."""
    rng, rows = random.Random(0), []
    for i in range(count):
        steps = arith_lines(rng)
        labels = [rng.random() < 0.5 for _ in steps]
        rows.append({"prompt": f"{i}+1=?\n", "completions": [s if ok else s + "?" for s, ok in zip(steps, labels)],
                     "labels": labels, "soft_labels": [float(y) for y in labels], "reference": str(i + 1)})
    return rows


def run_dir_of(result) -> Path:
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("run dir: ")
    return Path(last.removeprefix("run dir: "))


def test_process_metrics_by_hand():
    probabilities = [[0.9, 0.2, 0.8], [0.9, 0.9], [0.3, 0.9], [0.9, 0.6]]
    labels = [[True, False, False], [True, True], [True, False], [True, True]]
    m = process_metrics(probabilities, labels, threshold=0.5)
    # steps right: row 0 3/3 (0.8 vs False is wrong: 2/3), row 1 2/2, row 2 0/2, row 3 2/2 -> 6/9
    assert m["step_accuracy"] == pytest.approx(6 / 9)
    # first errors predicted/gold: 1/1, -1/-1, 0/1, -1/-1 -> erroneous rows 1/2 right, correct rows 2/2
    assert m["acc_error"] == pytest.approx(0.5) and m["acc_correct"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert m["first_error_accuracy"] == pytest.approx(0.75) and m["solution_accuracy"] == pytest.approx(1.0)
    assert math.isnan(process_metrics([[0.9]], [[True]], 0.5)["f1"])  # no erroneous row: F1 undefined


def test_split_holds_out_whole_prompts():
    rows = [{"prompt": str(i // 3)} for i in range(30)]  # 10 prompts x 3 rows
    train, held = split_by_prompt(rows, PRMTraining.key, 0.2, seed=0)
    assert len(held) == 6 and len(train) == 24
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_orm_pairs_from_a_run_directory(tmp_path):
    """Correct vs incorrect completions of the same prompt by `gold`; a prompt with one kind gives none."""
    batch = make_batch(["1+1=?\n"] * 3 + ["2+2=?\n"] * 2, ["2", "2", "3", "4", "4 "], ["2", "2", "2", "4", "4"])
    batch.gold = [True, True, False, True, True]
    batch.save(tmp_path / "rollouts" / "iter_001.parquet")
    rows = ORMTraining(data=str(tmp_path)).read(seed=0)
    assert rows == [{"messages": [{"role": "user", "content": "1+1=?\n"}], "chosen": "2", "rejected": "3"}]


def test_bad_preference_and_label_rows_name_file_and_row(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1+1=?\n", "chosen": "2"}])
    with pytest.raises(UserError, match=rf"{pairs}:1 has no `rejected`"):
        ORMTraining(data=str(pairs)).read(seed=0)
    with pytest.raises(UserError, match="has no labels.jsonl"):
        PRMTraining(data=str(tmp_path)).read(seed=0)


def test_prm_trains_and_loads_through_reward_prm(tmp_path):
    """End to end on the tiny backbone with a non-default separator: the held-out step accuracy rises,
    model/ loads with reward=prm's auto format and the saved separator, and it scores a completion at
    exactly the positions training labelled."""
    from rewardlab.rewards.prm import PRMReward

    data = write_jsonl(tmp_path / "labels.jsonl", stepwise_rows(64))
    result = run_cli("train-rm", f"rm.data={data}", "rm.epochs=3", "rm.lr=3e-3", "rm.step_tag=:",
                     "rm.format=token_classification", *FAST,
                     f"hydra.run.dir={tmp_path / 'run'}")
    run_dir = run_dir_of(result)
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and all("rm/train/loss" in r for r in rows[1:])
    assert rows[-1]["rm/eval/step_accuracy"] >= 0.9 > rows[0]["rm/eval/step_accuracy"]
    assert {"rm/eval/f1", "rm/eval/first_error_accuracy", "rm/eval/solution_accuracy"} <= set(rows[-1])

    reward = PRMReward(model=str(run_dir / "model"), device="cpu")
    assert reward.format == "token_classification" and reward.tag == ":"
    prompt, steps = "7+1=?\n", ["3+4=7", "#### 7?"]
    batch = make_batch([prompt], ["\n".join(steps)], ["7"])
    reward.score(batch)
    encoded = PRMTraining(format="token_classification", step_tag=":").encode({"prompt": prompt, "steps": steps, "labels": [True, False]},
                                               reward.tokenizer)
    labelled = [i for i, y in enumerate(encoded["labels"]) if y != -100]
    with torch.no_grad():
        logits = reward.model(input_ids=torch.tensor([encoded["input_ids"]])).logits[0]
    assert batch.step_rewards[0] == pytest.approx(logits[labelled].softmax(-1)[:, 1].tolist(), abs=1e-5)
    assert batch.step_rewards[0][0] > batch.step_rewards[0][1]  # the learned rule, read where trained


def test_orm_trains_and_loads_through_reward_orm(tmp_path):
    """TRL's RewardTrainer on preference rows learns the rule, and reward=orm scores the saved model on
    exactly the tokens it was trained on."""
    from rewardlab.rewards.orm import ORMReward

    rng = random.Random(1)
    pairs = [{"prompt": f"{i}+0=?\n", "chosen": "\n".join(arith_lines(rng)),
              "rejected": "\n".join(arith_lines(rng)) + "?"} for i in range(64)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    run_dir = run_dir_of(run_cli("train-rm", "rm=orm", f"rm.data={data}", "rm.epochs=3", "rm.lr=3e-3", *FAST,
                                 f"hydra.run.dir={tmp_path / 'run'}"))
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    # a fixed rule gives an untrained head ~0 or ~1 pair accuracy by chance: check the Bradley-Terry loss fell
    assert rows[-1]["rm/eval/pair_accuracy"] >= 0.9 and rows[-1]["rm/train/loss"] < rows[1]["rm/train/loss"]

    reward = ORMReward(model=str(run_dir / "model"), device="cpu")
    batch = make_batch(["5+0=?\n"] * 2, ["2+3=5\n#### 5", "2+3=5\n#### 5?"], ["5"] * 2)
    scores = reward.compute(batch)
    ids = ORMTraining().ids(reward.tokenizer, batch.conversation(0), batch.completion[0])
    with torch.no_grad():
        direct = reward.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert scores[0] == pytest.approx(direct, abs=1e-5) and scores[0] > scores[1]


@pytest.mark.parametrize("case", ["mismatch", "missing"])
def test_bad_data_one_line_exit_2_nothing_written(tmp_path, case):
    rows = stepwise_rows(3)
    rows[1]["labels"] = rows[1]["labels"][:1]
    data = write_jsonl(tmp_path / "labels.jsonl", rows) if case == "mismatch" else tmp_path / "absent.jsonl"
    run_dir = tmp_path / "run"
    result = run_cli("train-rm", f"rm.data={data}", *FAST, f"hydra.run.dir={run_dir}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(data) in lines[0]
    assert (f"{data}:2" in lines[0]) if case == "mismatch" else "does not exist" in lines[0]
    assert not run_dir.exists()


@pytest.mark.parametrize("fmt", ["next_token", "math_shepherd"])
def test_lm_head_prm_trains_and_scores_at_inference_what_training_predicts(tmp_path, fmt):
    """rm.format=next_token (the default) / math_shepherd: next-token +/- from the policy's own LM head, at the
    separator of the text as the policy writes it / at Math-Shepherd's tag. model/ loads through reward=prm with
    the saved format and tag; its step scores equal, on the same rows, the predictions train-rm's held-out
    metrics were computed from (no off-by-one between training and scoring), and the labels sit exactly at the
    scored positions."""
    from rewardlab.rewards.prm import PRMReward

    data = write_jsonl(tmp_path / "labels.jsonl", stepwise_rows(64))
    run_dir = run_dir_of(run_cli("train-rm", f"rm.data={data}", f"rm.format={fmt}", "rm.epochs=8",
                                 "rm.lr=3e-3", *FAST, f"hydra.run.dir={tmp_path / 'run'}"))
    rows = read_metrics(run_dir)
    assert rows[-1]["rm/eval/step_accuracy"] >= 0.9
    reward = PRMReward(model=str(run_dir / "model"), device="cpu")
    tag = {"next_token": "\n", "math_shepherd": ":"}[fmt]
    assert reward.format == fmt and reward.tag == tag
    training = PRMTraining(format=fmt)
    candidates = [reward.tokenizer.encode(t, add_special_tokens=False)[-1] for t in "+-"]
    assert training.candidates(reward.tokenizer) == candidates

    held = [{"prompt": r["prompt"], "steps": r["completions"], "labels": r["labels"]} for r in stepwise_rows(80)[64:]]
    predicted = training.probabilities(reward.model, reward.tokenizer, held)
    batch = make_batch([r["prompt"] for r in held], ["\n".join(r["steps"]) for r in held], ["0"] * len(held))
    reward.score(batch)
    assert [len(s) for s in batch.step_rewards] == [len(r["steps"]) for r in held]
    for scored, trained in zip(batch.step_rewards, predicted):
        assert scored == pytest.approx(trained, abs=1e-5)
    hits = [(p >= 0.5) == y for s, r in zip(batch.step_rewards, held) for p, y in zip(s, r["labels"])]
    assert sum(hits) / len(hits) >= 0.9  # the learned rule, read where it was trained

    encoded = training.encode({**held[0], "labels": [True, False]}, reward.tokenizer)
    ids, positions = training.ids(reward.tokenizer, held[0])
    assert encoded["input_ids"] == ids and len(positions) == 2
    assert [i for i, y in enumerate(encoded["labels"]) if y != -100] == positions  # trained where it is scored
    assert [encoded["labels"][p] for p in positions] == [1, 0]
    if fmt == "next_token":  # the policy's own text: question, then each step and a newline
        assert reward.tokenizer.decode(ids) == held[0]["prompt"] + "".join(s + "\n" for s in held[0]["steps"])


def test_prm_format_and_tag_refused_in_one_line(tiny_policy):
    with pytest.raises(UserError, match="rm.format='orm' is not one of"):
        PRMTraining(format="orm")
    with pytest.raises(UserError, match="'ки' .* is not a token of"):  # the char tokenizer has no Cyrillic
        PRMTraining(format="math_shepherd", step_tag="ки").build(tiny_policy.source, tiny_policy.tokenizer)


def test_lm_weight_targets_the_right_prefix_and_adds_the_policy_loss(tiny_policy):
    """rm.lm_weight: the policy's own next token is the target at every position from the question's last
    token through the separator of the last step before the first wrong one; the +/- labels keep their
    positions; the loss is the +/- cross-entropy plus lm_weight x the next-token cross-entropy there."""
    from rewardlab.rmlab.train import LM_OFFSET

    tok = tiny_policy.tokenizer
    row = {"prompt": "3+4+5=?\n", "steps": ["3+4=7", "7+5=13", "#### 13"], "labels": [True, False, False]}
    plain = PRMTraining().encode(row, tok)
    training = PRMTraining(lm_weight=0.5)
    encoded = training.encode(row, tok)
    ids, positions = training.ids(tok, row)
    assert encoded["input_ids"] == plain["input_ids"] == ids
    assert [encoded["labels"][p] for p in positions] == [1, 0, 0] == [plain["labels"][p] for p in positions]
    own = [t for t, y in enumerate(encoded["labels"]) if y >= LM_OFFSET]
    first = len(ids) - len(tok.encode("3+4=7\n7+5=13\n#### 13\n", add_special_tokens=False)) - 1
    assert own == list(range(first, positions[0]))  # "3+4=7\n" predicted from the question's last "\n" on
    assert tok.decode([encoded["labels"][t] - LM_OFFSET for t in own]) == "3+4=7\n"
    none_right = training.encode({**row, "labels": [False, False, False]}, tok)
    assert not [y for y in none_right["labels"] if y >= LM_OFFSET]

    torch.manual_seed(0)
    labels = torch.tensor([encoded["labels"]])
    logits = torch.randn(1, len(ids), len(tok))
    scored = torch.tensor(positions)
    good_bad = torch.tensor(training.candidates(tok))[1 - labels[0, scored]]
    want = torch.nn.functional.cross_entropy(logits[0, scored], good_bad) + 0.5 * torch.nn.functional.cross_entropy(
        logits[0, own], labels[0, own] - LM_OFFSET)
    got = training.lm_loss(tok)(type("Out", (), {"logits": logits})(), labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert PRMTraining().lm_loss(tok)(type("Out", (), {"logits": logits})(), torch.tensor([plain["labels"]])).item() \
        == pytest.approx(torch.nn.functional.cross_entropy(logits[0, scored], good_bad).item(), rel=1e-6)
    with pytest.raises(UserError, match="rm.lm_weight=0.5 needs rm.format=next_token"):
        PRMTraining(lm_weight=0.5, format="math_shepherd")


def test_lora_prm_keeps_the_best_epoch_and_saves_a_plain_model(tmp_path):
    """rm.lora_r trains adapters that are merged on save (model/ loads as a plain model through reward=prm);
    rm.keep_best saves the epoch with the best held-out F1, and the saved model scores the held-out rows
    exactly as that epoch's metrics say."""
    from rewardlab.rewards.prm import PRMReward
    from rewardlab.rmlab.train import process_metrics

    rows = stepwise_rows(64)
    data = write_jsonl(tmp_path / "labels.jsonl", rows)
    run_dir = run_dir_of(run_cli("train-rm", f"rm.data={data}", "rm.epochs=6", "rm.lr=1e-2", "rm.lora_r=8",
                                 "rm.keep_best=true", "rm.lm_weight=0.5", *FAST, f"hydra.run.dir={tmp_path / 'run'}"))
    metrics = read_metrics(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    trained = [r for r in metrics if r["epoch"] > 0]
    best = max(r["rm/eval/f1"] for r in trained)
    kept = max(r["epoch"] for r in trained if r["rm/eval/f1"] == best)  # ties: the later epoch
    assert summary["epoch"] == kept and summary["final"]["rm/eval/f1"] == best
    assert not (run_dir / "model" / "adapter_config.json").exists()
    reward = PRMReward(model=str(run_dir / "model"), device="cpu")
    assert reward.format == "next_token"
    _, held = split_by_prompt([{**r, "steps": r["completions"]} for r in rows], PRMTraining.key, 0.25, seed=0)
    probabilities = reward.step_scores([r["prompt"] for r in held], [r["steps"] for r in held])
    again = process_metrics(probabilities, [r["labels"] for r in held], 0.5)
    assert again["f1"] == pytest.approx(best) and again["step_accuracy"] == pytest.approx(
        summary["final"]["rm/eval/step_accuracy"])
    assert again["step_accuracy"] >= 0.9  # the adapters learned the rule


def test_prm_lm_recipe_is_the_prm_with_the_lm_term_and_the_best_epoch():
    """rm=prm_lm (README "The reward-model lab", second pass): the prm settings with lm_weight 1, keep_best and
    12 epochs, and it builds."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from rewardlab.config import register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rewardlab.conf", version_base="1.3"):
        cfg = compose(config_name="train_rm", overrides=["rm=prm_lm", "rm.data=x"])
    rm = instantiate(cfg.rm)
    assert isinstance(rm, PRMTraining)
    assert (rm.cfg.format, rm.cfg.lm_weight, rm.cfg.keep_best, rm.cfg.epochs, rm.cfg.lr) == ("next_token", 1.0, True,
                                                                                             12, 1e-3)
