"""Honest evaluation of a Hugging Face model (base, or base + LoRA adapter) on labelled examples.

Decisions come from the next-token log-probabilities of the three option letters right after the
assistant turn opens, so no answer is ever unparseable. Because training shuffles the option order,
every example is asked in all six orders (:data:`corefbot.pipeline.prompt.ALL_ORDERS`) and the report gives
the mean and the spread over orders: a model that learned "always answer A" scores well on the two
orders where A is "needs" and badly on the others, and its mean shows it.
Rewrites are scored on the examples labelled "needs": the prompt is followed by the "needs" letter
and a newline, and the model writes one line greedily.
"""
from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from corefbot.pipeline.metrics import Confusion, exact_match, token_f1
from corefbot.pipeline.prompt import ALL_ORDERS, LETTERS, SERVE_ORDER, Order, Prompt, build_prompt
from corefbot.pipeline.records import Decision, Example

if TYPE_CHECKING:  # heavy imports stay inside functions
    import torch

log = logging.getLogger(__name__)

Metric = Literal["precision", "recall", "f1", "accuracy", "mcc"]
METRICS: tuple[Metric, ...] = ("precision", "recall", "f1", "accuracy", "mcc")


# ---- loading ----------------------------------------------------------------------------------

def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model_dir: str | Path, adapter: str | Path | None = None, *, device: str = "auto",
               dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode. ``model_dir`` may also be a finetune run folder, whose
    config names its base and whose ``adapter/`` is applied."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if (path / "adapter").is_dir() and (path / "config.yaml").is_file() and adapter is None:
        import yaml

        run = yaml.safe_load((path / "config.yaml").read_text())
        adapter, path = path / "adapter", Path(run["base"])
        if not (path / "config.json").is_file() and run.get("base_gguf"):
            from corefbot.models.train.base import resolve_base

            path = resolve_base(run["base_gguf"]).hf_dir  # the cached conversion was deleted: redo it
    elif path.is_file():  # a GGUF: its cached float32 conversion
        from corefbot.models.train.base import resolve_base

        path = resolve_base(path).hf_dir
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model folder)")
    dev = pick_device(device)
    torch_dtype = torch_dtype_for(dtype, dev)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(dev)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).to(dev)
    model.eval()
    return model, tokenizer


# The /proc/cpuinfo flags of bfloat16 arithmetic in hardware: x86 AVX512-BF16 and AMX, Arm's BF16 extension.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU multiplies bfloat16 in hardware: x86 AVX512-BF16 or AMX, Arm's BF16 extension.

    Reads /proc/cpuinfo's flags (or the text given); False where it cannot be read.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return not BF16_FLAGS.isdisjoint(value.split())
    return False


def torch_dtype_for(dtype: str, device: str) -> "torch.dtype":
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(dtypes)}")
    if dtype == "bfloat16" and device == "cpu" and not cpu_has_native_bf16():
        # The CPU presets ask for bfloat16 because a CPU with AVX512-BF16 multiplies it ~4.6x faster than float32
        # (models/EXPERIMENTS.md); one without it emulates bfloat16, slower than float32, so it trains in float32.
        log.warning("bfloat16 asked for, but /proc/cpuinfo lists no bfloat16 instructions (%s): float32 instead",
                    ", ".join(sorted(BF16_FLAGS)))
        return torch.float32
    return dtypes[dtype]


def parameter_count(model: Any) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return sum(p.numel() for p in base.parameters())


# ---- the model pieces both training and evaluation use ----------------------------------------

def decoder_and_head(model: Any) -> tuple[Any, Any]:
    """The transformer body and the output projection of a causal LM (peft-wrapped or not), so
    callers can apply the vocabulary projection to the few positions they need instead of all."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


def shared_prefix(seqs: Sequence[Sequence[int]], limit: int) -> int:
    """How many leading tokens all ``seqs`` have in common, at most ``limit``: the part a batch can
    compute once and share (every prompt opens with the same system text and header)."""
    first, limit = seqs[0], max(0, limit)
    for k in range(limit):
        if any(s[k] != first[k] for s in seqs):
            return k
    return limit


def encode(tokenizer: Any, prompt_text: str, response: str | None = None) -> tuple[list[int], int]:
    """Token ids of a prompt (and response), and how many of them belong to the prompt.

    The two parts are tokenized separately and joined: what a model is trained to produce after
    the prompt is exactly what it is asked for at serving time, whatever the tokenizer's merges.
    """
    ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    n_prompt = len(ids)
    if response is not None:
        ids = ids + tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids, n_prompt


def letter_ids(tokenizer: Any) -> tuple[int, ...]:
    """The token each option letter starts with when it opens the assistant's answer."""
    from corefbot.pipeline.records import Turn

    probe = build_prompt((), Turn("a", "?", 0.0)).chatml()
    base, _ = encode(tokenizer, probe)
    out = []
    for letter in LETTERS:
        ids, _ = encode(tokenizer, probe, letter)
        extra = ids[len(base):]
        if len(extra) != 1:
            raise ValueError(f"option letter {letter!r} is {len(extra)} tokens for this tokenizer; expected 1")
        out.append(extra[0])
    if len(set(out)) != len(out):
        raise ValueError(f"option letters share a token id: {out}")
    return tuple(out)


def batches_by_length(lengths: Sequence[int], max_tokens: int, max_batch: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, each under a padded-token budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) >= max_batch or width * (len(cur) + 1) > max_tokens):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def pad(seqs: Sequence[Sequence[int]], pad_id: int, device: str) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Right-padded ids and the attention mask."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids.to(device), mask.to(device)


def option_logprobs(model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, max_tokens: int = 16_384,
                    max_batch: int = 32, progress: bool = False) -> list[tuple[float, float, float]]:
    """Log-probabilities of the letters A, B, C as the assistant's first token, per prompt."""
    import torch
    from tqdm import tqdm

    letters = torch.tensor(letter_ids(tokenizer))
    encoded = [encode(tokenizer, p.chatml())[0] for p in prompts]
    body, head = decoder_and_head(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * len(prompts)
    groups = batches_by_length([len(e) for e in encoded], max_tokens, max_batch)
    with torch.inference_mode():
        for idx in tqdm(groups, desc="scoring", unit="batch", disable=not progress, leave=False):
            ids, mask = pad([encoded[i] for i in idx], pad_id, str(device))
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
            last = hidden[torch.arange(len(idx), device=device), mask.sum(1) - 1]
            logp = torch.log_softmax(head(last).float(), dim=-1)[:, letters.to(device)].cpu()
            for row, i in enumerate(idx):
                out[i] = tuple(logp[row].tolist())  # type: ignore[assignment]
    return out


def shared_prefix_logprobs(model: Any, tokenizer: Any, groups: Sequence[Sequence[Prompt]], *,
                           progress: bool = False) -> list[list[tuple[float, float, float]]]:
    """Like :func:`option_logprobs` for groups of prompts that differ only near the end (one example
    in several option orders): the common token prefix is computed once per group and its key/value
    cache reused by every member, so six orders cost little more than one."""
    import torch
    from tqdm import tqdm

    letters = torch.tensor(letter_ids(tokenizer))
    body, head = decoder_and_head(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[list[tuple[float, float, float]]] = []
    with torch.inference_mode():
        for group in tqdm(groups, desc="scoring", unit="example", disable=not progress, leave=False):
            encoded = [encode(tokenizer, p.chatml())[0] for p in group]
            n = shared_prefix(encoded, min(len(e) for e in encoded) - 1)  # each keeps a token of its own
            prefix = torch.tensor([encoded[0][:n]], device=device)
            cache = body(input_ids=prefix, use_cache=True).past_key_values if n else None
            if cache is not None:
                cache.batch_repeat_interleave(len(group))
            tails = [e[n:] for e in encoded]
            ids, mask = pad(tails, pad_id, str(device))
            full_mask = torch.cat([torch.ones((len(group), n), dtype=mask.dtype, device=device), mask], dim=1)
            positions = (n + torch.arange(ids.shape[1], device=device)).unsqueeze(0).expand(len(group), -1)
            hidden = body(input_ids=ids, attention_mask=full_mask, position_ids=positions,
                          past_key_values=cache, use_cache=cache is not None).last_hidden_state
            last = hidden[torch.arange(len(group), device=device), mask.sum(1) - 1]
            logp = torch.log_softmax(head(last).float(), dim=-1)[:, letters.to(device)].cpu()
            out.append([tuple(row.tolist()) for row in logp])  # type: ignore[misc]
    return out


def decide(prompt: Prompt, logps: Sequence[float]) -> Decision:
    return prompt.order[max(range(len(LETTERS)), key=lambda k: logps[k])]


# ---- decision metrics over option orders --------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Stat:
    mean: float
    std: float  # population standard deviation over orders
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        return cls(statistics.fmean(values), statistics.pstdev(values), min(values), max(values))


@dataclass(frozen=True, slots=True)
class OrderResult:
    order: Order
    confusion: Confusion
    predicted: tuple[Decision, ...]  # one per example, in the evaluation's example order
    letter_share: tuple[float, ...]  # share of answers on A, B, C: a letter-biased model shows here


@dataclass(frozen=True, slots=True)
class DecisionEval:
    ids: tuple[str, ...]
    gold: tuple[Decision, ...]
    per_order: tuple[OrderResult, ...]

    def stat(self, metric: Metric) -> Stat:
        return Stat.of([getattr(r.confusion, metric) for r in self.per_order])

    def order_result(self, order: Order) -> OrderResult:
        for r in self.per_order:
            if r.order == order:
                return r
        raise KeyError(f"order {order} was not evaluated")

    def summary(self) -> dict[str, Any]:
        """Fractions (0–1): each metric's mean/std/min/max over orders, plus per-order detail."""
        out: dict[str, Any] = {"examples": len(self.ids), "orders": len(self.per_order),
                               "needs": sum(g == "needs" for g in self.gold)}
        for m in METRICS:
            out[m] = asdict(self.stat(m))
        out["per_order"] = [
            {"order": list(r.order), **{m: getattr(r.confusion, m) for m in METRICS},
             "tp": r.confusion.tp, "fp": r.confusion.fp, "fn": r.confusion.fn, "tn": r.confusion.tn,
             "letter_share": list(r.letter_share)}
            for r in self.per_order
        ]
        return out


def score_decisions(examples: Sequence[Example], predicted: dict[Order, Sequence[Decision]],
                    answered_letters: dict[Order, Sequence[str]] | None = None) -> DecisionEval:
    """Build the report from decisions already made (any backend), positive class = needs."""
    gold = tuple(e.label for e in examples)
    results = []
    for order, preds in predicted.items():
        if len(preds) != len(examples):
            raise ValueError(f"order {order}: {len(preds)} decisions for {len(examples)} examples")
        conf = Confusion.of((g == "needs" for g in gold), (p == "needs" for p in preds))
        letters = answered_letters[order] if answered_letters else [LETTERS[order.index(p)] for p in preds]
        n = max(1, len(letters))
        share = tuple(sum(x == L for x in letters) / n for L in LETTERS)
        results.append(OrderResult(order, conf, tuple(preds), share))
    return DecisionEval(tuple(e.id for e in examples), gold, tuple(results))


def _shared_share(example: Example, orders: Sequence[Order]) -> float:
    """How much of an example's prompt text its option orders share: reusing the prefix's cache
    only pays when the options come late in the prompt; otherwise large plain batches are faster."""
    import os

    texts = [build_prompt(example.window, example.question, o).chatml() for o in orders]
    return len(os.path.commonprefix(texts)) / max(len(t) for t in texts)


def evaluate_decisions(model: Any, tokenizer: Any, examples: Sequence[Example],
                       orders: Sequence[Order] = ALL_ORDERS, *, progress: bool = False,
                       max_batch: int = 32) -> DecisionEval:
    """Ask every example in every order; decisions by option-letter log-probs."""
    if not examples:
        raise ValueError("no examples to evaluate")
    prompts = [build_prompt(e.window, e.question, o) for o in orders for e in examples]
    if len(orders) > 1 and _shared_share(examples[0], orders) >= 0.5:
        per_example = [[build_prompt(e.window, e.question, o) for o in orders] for e in examples]
        by_example = shared_prefix_logprobs(model, tokenizer, per_example, progress=progress)
        logps = [by_example[i][k] for k in range(len(orders)) for i in range(len(examples))]
    else:
        logps = option_logprobs(model, tokenizer, prompts, progress=progress, max_batch=max_batch)
    predicted: dict[Order, list[Decision]] = {}
    for k, (p, lp) in enumerate(zip(prompts, logps)):
        predicted.setdefault(p.order, []).append(decide(p, lp))
    return score_decisions(examples, predicted)


# ---- rewrites ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RewriteEval:
    examples: int
    exact_match: float
    token_f1: float
    samples: tuple[tuple[str, str, str], ...]  # (question, gold, predicted), a few for the report

    def summary(self) -> dict[str, Any]:
        return {"examples": self.examples, "exact_match": self.exact_match, "token_f1": self.token_f1,
                "samples": [list(s) for s in self.samples]}


def generate_rewrites(model: Any, tokenizer: Any, examples: Sequence[Example], *, max_new_tokens: int = 48,
                      batch_size: int = 16, order: Order = SERVE_ORDER, progress: bool = False) -> list[str]:
    """One greedy line per example, after the prompt and the "needs" letter."""
    import torch
    from tqdm import tqdm

    device = next(model.parameters()).device
    prompts = [build_prompt(e.window, e.question, order) for e in examples]
    texts = [p.chatml() + p.letter("needs") + "\n" for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    stop = [i for i in (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id) if i is not None]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    out = [""] * len(examples)
    groups = batches_by_length([len(e) for e in encoded], 1 << 30, batch_size)
    with torch.inference_mode():
        for idx in tqdm(groups, desc="rewriting", unit="batch", disable=not progress, leave=False):
            width = max(len(encoded[i]) for i in idx)
            # Left padding so every row continues from its own last token.
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad_id)
            for r, i in enumerate(idx):
                text = tokenizer.decode(gen[r, width:], skip_special_tokens=True)
                out[i] = (text.strip().splitlines() or [""])[0].strip()
    return out


def evaluate_rewrites(model: Any, tokenizer: Any, examples: Sequence[Example], *, max_new_tokens: int = 48,
                      progress: bool = False) -> RewriteEval:
    needs = [e for e in examples if e.label == "needs" and e.rewrite]
    if not needs:
        return RewriteEval(0, math.nan, math.nan, ())
    return score_rewrites(needs, generate_rewrites(model, tokenizer, needs, max_new_tokens=max_new_tokens,
                                                   progress=progress))


def score_rewrites(needs: Sequence[Example], preds: Sequence[str]) -> RewriteEval:
    """Exact match and token F1 (characters for Chinese) of ``preds`` against the gold rewrites of ``needs``."""
    em = statistics.fmean(exact_match(p, e.rewrite or "") for p, e in zip(preds, needs))
    f1 = statistics.fmean(token_f1(p, e.rewrite or "") for p, e in zip(preds, needs))
    samples = tuple((e.question.text, e.rewrite or "", p) for e, p in list(zip(needs, preds))[:5])
    return RewriteEval(len(needs), em, f1, samples)


def evaluate(model: Any, tokenizer: Any, examples: Sequence[Example], *, rewrites: bool = True,
             max_new_tokens: int = 48, progress: bool = False) -> dict[str, Any]:
    """The full report for one split: decisions over all orders, and rewrites when asked."""
    report: dict[str, Any] = {"decision": evaluate_decisions(model, tokenizer, examples, progress=progress).summary()}
    if rewrites:
        report["rewrite"] = evaluate_rewrites(model, tokenizer, examples, max_new_tokens=max_new_tokens,
                                              progress=progress).summary()
    return report


def response_losses(model: Any, tokenizer: Any, items: Sequence[tuple[Sequence[int], int]], *,
                    max_tokens: int = 16_384, max_batch: int = 32, progress: bool = False,
                    desc: str = "losses") -> list[float]:
    """Mean cross-entropy of each sequence's tokens after its first ``n_prompt`` (the answer),
    one value per ``(ids, n_prompt)``; the vocabulary projection runs on the answer positions only."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    body, head = decoder_and_head(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = [math.nan] * len(items)
    groups = batches_by_length([len(ids) for ids, _ in items], max_tokens, max_batch)
    with torch.inference_mode():
        for idx in tqdm(groups, desc=desc, unit="batch", disable=not progress, leave=False):
            ids, mask = pad([items[i][0] for i in idx], pad_id, str(device))
            target = torch.zeros_like(mask, dtype=torch.bool)
            for r, i in enumerate(idx):
                seq, n_prompt = items[i]
                target[r, max(1, n_prompt): len(seq)] = True
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
            sel = target[:, 1:]
            logits = head(hidden[:, :-1][sel]).float()
            tok_loss = F.cross_entropy(logits, ids[:, 1:][sel], reduction="none").cpu()
            counts = sel.sum(1).tolist()
            start = 0
            for r, i in enumerate(idx):
                n = counts[r]
                out[i] = float(tok_loss[start:start + n].mean()) if n else math.nan
                start += n
    return out
