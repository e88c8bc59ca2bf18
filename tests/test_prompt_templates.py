"""Prompt templates: chat prompts through a tokenizer's own chat template, plain prompts, few-shot, BOS."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_chat import chat_tokenizer

from rewardlab.data.gsm8k import BOXED_INSTRUCTION, GSM8KTask
from rewardlab.data.templates import PromptTemplate
from rewardlab.errors import UserError
from rewardlab.policy.tiny import build_tokenizer

DATA = Path(__file__).parent / "fixtures" / "data"


def test_chat_prompt_uses_the_tokenizers_chat_template_with_system_and_instruction():
    template = PromptTemplate(chat=True, system="You are exact.", instruction="Answer after ####.")
    text = template.format("1+2=?", [], chat_tokenizer())
    assert text == "<|system|>\nYou are exact.\n<|user|>\n1+2=?\nAnswer after ####.\n<|assistant|>\n"


def test_chat_few_shot_examples_are_earlier_turns():
    text = PromptTemplate(chat=True).format("3+4=?", [("1+1=?", "1+1=2\n#### 2")], chat_tokenizer())
    assert text == "<|user|>\n1+1=?\n<|assistant|>\n1+1=2\n#### 2\n<|user|>\n3+4=?\n<|assistant|>\n"


def test_chat_prompt_tokens_round_trip_through_the_tiny_tokenizer():
    tokenizer = chat_tokenizer()
    text = PromptTemplate(chat=True).format("12+5=?", [], tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "12+5=?" in tokenizer.decode(ids)


def test_chat_without_a_chat_template_is_a_user_error():
    with pytest.raises(UserError, match="no chat template; set dataset.prompt.chat=false"):
        PromptTemplate(chat=True).format("1+1=?", [], build_tokenizer())


def test_plain_prompt_layout():
    template = PromptTemplate(chat=False, system="Solve.", instruction="End with #### x.")
    text = template.format("3+4=?", [("1+1=?", "1+1=2\n#### 2")], build_tokenizer())
    assert text == "Solve.\n\n1+1=?\nEnd with #### x.\n1+1=2\n#### 2\n\n3+4=?\nEnd with #### x.\n"


def test_plain_prompt_starts_with_bos_when_the_tokenizer_adds_one():
    from tokenizers import processors

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<eos>"})
    assert PromptTemplate(chat=False).format("1+1=?", [], tokenizer) == "1+1=?\n"  # this tokenizer adds none
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<eos> $A", special_tokens=[("<eos>", tokenizer.eos_token_id)])
    assert PromptTemplate(chat=False).format("1+1=?", [], tokenizer) == "<eos>1+1=?\n"


def test_gsm8k_task_formats_with_the_chat_template_and_keeps_few_shot_out_of_training():
    task = GSM8KTask(path=str(DATA / "gsm8k_train.jsonl"), test_path=str(DATA / "gsm8k_test.jsonl"),
                     prompt={"chat": True, "system": "Be brief.", "instruction": BOXED_INSTRUCTION, "few_shot": 1})
    task.prepare(chat_tokenizer())
    train, test = task.train_examples(), task.test_examples()
    assert len(train) == 3  # one of the four rows became the few-shot example
    starts = {"72": "Natalia", "10": "Weng", "5": "Betty", "2000": "A farm"}
    (shot_answer,) = set(starts) - {e.answer for e in train}
    shot = starts[shot_answer]
    prompt = test[1].prompt
    assert prompt.startswith("<|system|>\nBe brief.\n<|user|>\n" + shot)
    assert prompt.endswith("<|user|>\nA robe takes 2 bolts of blue fiber and half that much white fiber.  "
                           "How many bolts in total does it take?\n" + BOXED_INSTRUCTION + "\n<|assistant|>\n")
    assert prompt.count("<|assistant|>") == 2 and "#### " in prompt  # the shot's worked solution
    assert all(e.prompt.count("<|user|>") == 2 for e in train)
