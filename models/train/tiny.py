"""Locally made Qwen2-architecture models: random weights, a byte-level BPE tokenizer trained here.

No hub exists on the machines this project is tested on, so tests, the demo and the benchmarks build
their models with this module and still run the real load / train / merge / convert / quantize code.
``qwen2.5-0.5b`` is compute-identical to Qwen2.5-0.5B-Instruct (same shape and vocabulary size).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

log = logging.getLogger(__name__)

Shape = Literal["tiny", "qwen2.5-0.5b", "small"]

# Qwen2's pre-tokenizer split, so llama.cpp can treat the tokenizer as "qwen2".
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True, slots=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int | None  # None: the tokenizer's size rounded up to 64
    tokenizer_vocab: int
    max_position_embeddings: int


SHAPES: dict[str, ModelShape] = {
    # hidden 256: Q4_K needs rows that are multiples of 256, so tests exercise real Q4_K blocks.
    "tiny": ModelShape(256, 512, 2, 4, 2, None, 2048, 4096),
    "qwen2.5-0.5b": ModelShape(896, 4864, 24, 14, 2, 151_936, 8192, 32_768),
    # ~13M parameters: big enough for training benchmarks and a two-rung scaling ladder with "tiny".
    "small": ModelShape(512, 1536, 4, 8, 2, None, 4096, 4096),
}


def _corpus() -> list[str]:
    """Text to train the tokenizer on: the prompt template, bilingual chat lines, digits and ASCII."""
    from corefbot.pipeline import prompt

    lines = [prompt.SYSTEM, prompt.HEADER.format(options=""), prompt.NO_HISTORY, prompt.QUESTION_SCORE_PROMPT,
             *prompt.OPTION_TEXT.values(),
             "Last message, A:", "Last message, B:", "A. B. C. D."]
    lines += [
        "Can mmpose be deployed on mobile phones?", "BTW, how to deploy it on TX2?",
        "How to deploy mmpose on TX2?", "Does it support CUDA 12? Which version of PyTorch do you use?",
        "mmpose 能部署到手机上吗？", "顺便问一下，它怎么部署到 TX2 上？", "为什么不好用？", "在 TX2 上呢？",
        "那个怎么装？", "请问这个报错怎么解决", "我试了一下，还是不行", "谢谢大家，已经解决了",
        "The quick brown fox jumps over the lazy dog. What is this? Why does that fail?",
        "它 他 她 这 那 这个 那个 这些 那些 哪个 怎么 如何 为什么 什么 吗 呢 吧 啊 了 的 是 不 在 有 和 就",
        "it they them this that these those he she one there here what which who how why when where",
        "0123456789 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ ？，。！：；「」（）【】、",
    ]
    return lines * 20


def train_tokenizer(vocab_size: int, extra_text: Iterable[str] = ()):
    """A byte-level BPE with Qwen2's split and ChatML special tokens, as a transformers tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([*_corpus(), *extra_text], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(shape: Shape | str, out_dir: str | Path, *, seed: int = 0,
               initializer_range: float = 0.2) -> Path:
    """Write a random-weight Qwen2 model and its tokenizer to ``out_dir`` (HF format, safetensors).

    ``initializer_range`` 0.2 rather than the default 0.02: a tiny model initialised at 0.02 with tied,
    frozen embeddings learns nothing in a few LoRA steps, and tests need a model that can.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose one of {', '.join(SHAPES)}")
    spec = SHAPES[shape]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(spec.tokenizer_vocab)
    vocab = spec.vocab_size or (len(tokenizer) + 63) // 64 * 64
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        initializer_range=initializer_range, use_sliding_window=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log.info("wrote %s model (%s parameters) to %s", shape, f"{model.num_parameters():,}", out)
    return out
