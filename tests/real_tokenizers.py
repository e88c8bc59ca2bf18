"""Real tokenizer conventions, built locally: byte-level BPE tokenizers trained here (`tokenizers`) and
saved with the public Qwen2.5-Instruct and Llama-3-Instruct chat templates and special tokens, a
Mistral-style tokenizer (sentencepiece-like BPE that adds BOS `<s>`), and tiny random Qwen2 / Llama /
Mistral models (hidden 32) with the heads each reward loads.

`real_models` (session-scoped) builds every directory once, in about a second:
  qwen_policy   Qwen2ForCausalLM, Qwen2.5 template, eos <|im_end|> (a policy for `policy.path=`)
  llama_policy  LlamaForCausalLM, Llama-3 template, BOS <|begin_of_text|> added by the tokenizer
  qwen_orm      Qwen2ForSequenceClassification (one label), Qwen2.5 template
  llama_orm     LlamaForSequenceClassification (one label), Llama-3 template
  qwen_prm      Qwen2ForTokenClassification (two labels), Qwen2.5 template, separator <extra_0>
  shepherd      MistralForCausalLM, Mistral-style tokenizer with BOS, step tag `ки` (Math-Shepherd)
  trl_prm       LlamaForTokenClassification (two labels), Mistral-style tokenizer (BOS): TRL's PRM format
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Qwen/Qwen2.5-0.5B-Instruct tokenizer_config.json `chat_template` (public text).
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json `chat_template` (public text): BOS inside.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

TEXT = [
    "What is 17 + 5? Please reason step by step, and put your final answer within \\boxed{}.",
    "17+5=22\n#### 22", "3+4=7\n7+10=17\n#### 17", "The capital of France is Paris.\n#### Paris",
    "Step 1: add the numbers. ки\nStep 2: the answer is 22. ки", "You are a helpful assistant.",
    "Review the user's question and the response. Score: 4", "[[A]] [[B]] [[C]] Response A is better.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 +-*/=?!.,:;'\"()[]{}<>#\\_",
] * 4

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>"]


def _byte_level(specials: list[str], bos: str | None = None):
    """A byte-level BPE (GPT-2/Qwen/Llama-3 style) trained on TEXT; prepends `bos` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def _mistral_like():
    """A Llama/Mistral-style (sentencepiece-like, `▁` word marks) BPE whose encode adds BOS `<s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set("".join(TEXT)) | {"▁", "к", "и"})
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=MISTRAL_SPECIALS,
                                                      initial_alphabet=alphabet))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def save_tokenizer(kind: str, directory: Path):
    """Save the `qwen`, `llama3` or `mistral` tokenizer to `directory` (Auto* loads it back) and return it."""
    from transformers import PreTrainedTokenizerFast

    if kind == "qwen":
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_level(QWEN_SPECIALS), eos_token="<|im_end|>",
                                            pad_token="<|endoftext|>", extra_special_tokens=QWEN_SPECIALS[1:])
        tokenizer.chat_template = QWEN25_TEMPLATE
    elif kind == "llama3":
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_level(LLAMA3_SPECIALS, bos="<|begin_of_text|>"),
                                            bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                            pad_token="<|end_of_text|>", extra_special_tokens=LLAMA3_SPECIALS[2:])
        tokenizer.chat_template = LLAMA3_TEMPLATE
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=_mistral_like(), bos_token="<s>", eos_token="</s>",
                                            unk_token="<unk>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def save_model(directory: Path, arch: str, head: str, tokenizer_kind: str, num_labels: int = 2, seed: int = 0) -> Path:
    """A tiny random `arch` (qwen2 | llama | mistral) model with `head` (causal | token | sequence), saved with
    its tokenizer."""
    import torch
    import transformers

    torch.manual_seed(seed)
    tokenizer = save_tokenizer(tokenizer_kind, directory)
    prefix = {"qwen2": "Qwen2", "llama": "Llama", "mistral": "Mistral"}[arch]
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=False, num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    suffix = {"causal": "ForCausalLM", "token": "ForTokenClassification", "sequence": "ForSequenceClassification"}[head]
    getattr(transformers, prefix + suffix)(config).save_pretrained(directory)
    return directory


SPECS = {
    "qwen_policy": ("qwen2", "causal", "qwen", 2),
    "llama_policy": ("llama", "causal", "llama3", 2),
    "qwen_orm": ("qwen2", "sequence", "qwen", 1),
    "llama_orm": ("llama", "sequence", "llama3", 1),
    "qwen_prm": ("qwen2", "token", "qwen", 2),
    "shepherd": ("mistral", "causal", "mistral", 2),
    "trl_prm": ("llama", "token", "mistral", 2),
}


@pytest.fixture(scope="session")
def real_models(tmp_path_factory) -> dict[str, Path]:
    """Every model of SPECS saved once per session: name -> directory."""
    root = tmp_path_factory.mktemp("real_models")
    return {name: save_model(root / name, *spec) for name, spec in SPECS.items()}
