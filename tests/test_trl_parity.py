"""TRL's GRPOTrainer loss and rewardlab's native loss agree: same tiny model, completions, advantages,
old and reference log-probs, clipping and beta; loss values and every parameter gradient match.

loss_type pairs: TRL `grpo` = our `sequence_mean`, `dapo` = `token_mean`, `dr_grpo` = `constant`.
One difference from METHODS.md is deliberately avoided rather than matched: TRL does not pass
position ids, so rows with left padding get shifted positions in TRL; rewardlab counts positions from
each row's first real token (METHODS.md defines the policy's log-prob, which padding must not change).
The prompts here have equal lengths so both see identical positions.
"""

from __future__ import annotations

import copy

import pytest
import torch

from rewardlab.algos.losses import aggregate, clipped_loss, to_tensors, token_logprobs
from rewardlab.rollout import Batch

TEMPERATURE, MAX_LEN, EPS_LOW, EPS_HIGH, BETA = 0.7, 12, 0.2, 0.28, 0.04


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rewardlab.policy import load_policy

    policy = load_policy(name="tiny", device="cpu", log=lambda *_: None)
    tok = policy.tokenizer
    prompts = ["12+34=?\n", "40+17=?\n", "21+30=?\n", "11+45=?\n"]
    completions = ["12+34=46\n#### 46", "40+17=57\n", "21+30=50\n#### 5", "11+4"]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completion_ids = [tok(c, add_special_tokens=False)["input_ids"][:MAX_LEN - 1] + [tok.eos_token_id]
                      for c in completions]
    completion_ids[3] = completion_ids[3][:-1]  # one truncated row: no EOS, shorter, padded on the right
    batch = Batch(prompt_id=[str(i) for i in range(4)], prompt=prompts, completion=completions,
                  prompt_ids=prompt_ids, completion_ids=completion_ids, finish_reason=["stop"] * 4,
                  reference=[None] * 4, solution=[None] * 4)
    ours = copy.deepcopy(policy.model)
    reference = copy.deepcopy(policy.model).eval()
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), use_cpu=True, report_to=[],
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=MAX_LEN,
                      temperature=TEMPERATURE, beta=BETA, epsilon=EPS_LOW, epsilon_high=EPS_HIGH,
                      disable_dropout=True, bf16=False, logging_steps=1)  # fp32 like ours (TRL defaults to bf16)
    trainer = GRPOTrainer(model=policy.model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                          args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1
    return trainer, ours, reference, batch


def trl_inputs(trainer, t, old, ref, adv):
    P = t.input_ids.shape[1] - t.completion_width
    mask = t.completion_mask.long()
    return {"prompt_ids": t.input_ids[:, :P], "prompt_mask": t.attention_mask[:, :P],
            "completion_ids": t.input_ids[:, P:], "completion_mask": mask, "advantages": adv,
            "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}


@pytest.mark.parametrize("trl_type,ours_agg", [("grpo", "sequence_mean"), ("dapo", "token_mean"),
                                               ("dr_grpo", "constant")])
def test_native_loss_and_gradients_match_trl(setup, trl_type, ours_agg):
    trainer, ours, reference, batch = setup
    trainer.loss_type = trl_type
    t = to_tensors(batch, trainer.processing_class.pad_token_id, torch.device("cpu"))
    mask = t.completion_mask
    adv = torch.tensor([1.2, -0.4, 0.3, -1.1])
    with torch.no_grad():
        ref = token_logprobs(reference, t, slice(None), TEMPERATURE)[0]
        current = token_logprobs(ours, t, slice(None), TEMPERATURE)[0]
    # the sampling policy differs from the current one, so ratios cross both clip edges
    old = (current + torch.linspace(-0.4, 0.4, current.numel()).reshape(current.shape)) * mask

    trainer.model.train()
    trainer.model.zero_grad()
    trl_loss = trainer.compute_loss(trainer.model, trl_inputs(trainer, t, old, ref, adv))
    trl_loss.backward()
    with torch.no_grad():  # TRL's own reference forward agrees with ours
        trl_ref = trainer._get_per_token_logps_and_entropies(trainer.ref_model, t.input_ids, t.attention_mask,
                                                             t.completion_width)[0]
    assert torch.allclose(trl_ref * mask, ref * mask, atol=1e-5)

    ours.train()
    ours.zero_grad()
    logps, _ = token_logprobs(ours, t, slice(None), TEMPERATURE)
    token_loss, stats = clipped_loss(logps, old, adv, mask, EPS_LOW, EPS_HIGH, BETA, ref)
    loss = aggregate(token_loss, mask, ours_agg, n_seqs=4, n_tokens=float(mask.sum()), max_new_tokens=MAX_LEN)
    loss.backward()

    assert 0 < float((stats["clipped"] * mask).sum()) < float(mask.sum())  # some tokens clipped, not all
    assert torch.allclose(loss.detach(), trl_loss.detach(), rtol=1e-5, atol=1e-7), (float(loss), float(trl_loss))
    theirs = dict(trainer.model.named_parameters())
    for name, param in ours.named_parameters():
        assert theirs[name].grad is not None and param.grad is not None, name
        assert torch.allclose(param.grad, theirs[name].grad, rtol=1e-4, atol=1e-7), name
