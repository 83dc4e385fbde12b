"""Training-data selection: learnability scores per example, and training on the top share.

- LoBaSS (learnability-based selection): ``(L_base − L_ref) / L_base`` where ``L_base`` is the
  example's answer loss under the base model and ``L_ref`` under a reference model fine-tuned on the
  full training split; the examples the model learns most from rank first.
- IFD (instruction-following difficulty, Cherry LLM): mean answer loss given the instruction divided
  by the mean answer loss alone (answer tokens only), under the base model; IFD > 1 means the
  instruction does not help at all and the example is dropped; the highest IFD ranks first.

Both compute losses on the answer tokens only. ``select_examples`` also trains the full-split model
(LoBaSS needs it as its reference; for IFD it is the baseline), so the run can report whether the
selection helped on the test split.
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

from corefbot.pipeline.records import Example

if TYPE_CHECKING:
    from corefbot.models.train.finetune import FinetuneConfig
    from corefbot.models.train.split import Split

log = logging.getLogger(__name__)

Method = Literal["lobass", "ifd"]
# The answer "alone": only the assistant turn's opening, so the answer tokens keep their template.
ANSWER_ALONE_PREFIX = "<|im_start|>assistant\n"


def learnability(l_base: float, l_ref: float) -> float:
    """LoBaSS: the relative loss reduction the reference fine-tune achieved on the example."""
    return (l_base - l_ref) / l_base if l_base > 0 else 0.0


def ifd(loss_given_instruction: float, loss_alone: float) -> float:
    """Cherry LLM's instruction-following difficulty."""
    return loss_given_instruction / loss_alone if loss_alone > 0 else math.inf


def top_share(examples: Sequence[Example], scores: Mapping[str, float], keep: float, *,
              drop_above: float | None = None) -> list[Example]:
    """The highest-scoring ``keep`` share of ``examples`` (of all of them, before dropping), in input
    order; examples scoring above ``drop_above`` or NaN are never kept. Ties break by id."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be a share in (0, 1], got {keep}")
    n = max(1, round(keep * len(examples)))
    eligible = [e for e in examples if not math.isnan(scores[e.id])
                and (drop_above is None or scores[e.id] <= drop_above)]
    ranked = sorted(eligible, key=lambda e: (-scores[e.id], e.id))[:n]
    chosen = {e.id for e in ranked}
    return [e for e in examples if e.id in chosen]


def answer_losses(model: Any, tokenizer: Any, examples: Sequence[Example], *, seed: int,
                  with_instruction: bool = True, progress: bool = False) -> dict[str, float]:
    """Mean answer-token loss per example id, rendered as in training (same balanced orders)."""
    from corefbot.models.train.finetune import encode_examples
    from corefbot.models.train.evaluate import encode, response_losses

    enc, _ = encode_examples(examples, tokenizer, seed=seed)
    if with_instruction:
        items = [(e.ids, e.n_prompt) for e in enc]
    else:
        items = []
        for e in enc:
            answer = tokenizer.decode(e.ids[e.n_prompt:], skip_special_tokens=False)
            items.append(encode(tokenizer, ANSWER_ALONE_PREFIX, answer))
    desc = "answer loss" + ("" if with_instruction else " alone")
    losses = response_losses(model, tokenizer, items, progress=progress, desc=desc)
    return {e.example_id: loss for e, loss in zip(enc, losses)}


@dataclass(frozen=True)
class Selection:
    method: Method
    keep: float
    scores: dict[str, float]
    kept: tuple[Example, ...]
    candidates: int
    dropped_ifd_over_1: int
    full_test: dict[str, Any]  # the full-split model's test report (the baseline)

    def summary(self) -> dict[str, Any]:
        finite = [s for s in self.scores.values() if math.isfinite(s)]
        return {"method": self.method, "keep": self.keep, "candidates": self.candidates,
                "kept": len(self.kept), "dropped_ifd_over_1": self.dropped_ifd_over_1,
                "score_mean": sum(finite) / len(finite) if finite else math.nan,
                "full_test": self.full_test}


def select_examples(base: str | Path, split: "Split", config: "FinetuneConfig", *, method: Method,
                    keep: float, out: str | Path | None = None, progress: bool = True) -> Selection:
    """Score the training split with ``method`` and keep the top ``keep`` share."""
    import gc

    from corefbot.models.train.finetune import train_and_eval
    from corefbot.models.train.evaluate import load_model

    if method not in ("lobass", "ifd"):
        raise ValueError(f"unknown selection method {method!r}; choose lobass or ifd")
    train = list(split.train)
    log.info("selection %s: training the full-split model on %d examples", method, len(train))
    session, _, full_metrics, _ = train_and_eval(base, train, split, config, progress=progress)
    base_model, tokenizer = load_model(base, device=config.device, dtype=config.dtype)
    l_base = answer_losses(base_model, tokenizer, train, seed=config.seed, progress=progress)
    dropped = 0
    if method == "lobass":
        l_ref = answer_losses(session.model, tokenizer, train, seed=config.seed, progress=progress)
        scores = {i: learnability(l_base[i], l_ref[i]) for i in l_base}
        kept = top_share(train, scores, keep)
    else:
        alone = answer_losses(base_model, tokenizer, train, seed=config.seed, with_instruction=False,
                              progress=progress)
        scores = {i: ifd(l_base[i], alone[i]) for i in l_base}
        dropped = sum(s > 1 for s in scores.values())
        kept = top_share(train, scores, keep, drop_above=1.0)
    del session, base_model
    gc.collect()
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        kept_ids = {e.id for e in kept}
        with open(out / f"{method}_scores.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "score", "kept"])
            for e in train:
                w.writerow([e.id, f"{scores.get(e.id, math.nan):.6f}", int(e.id in kept_ids)])
    log.info("selection %s: kept %d of %d (%d dropped with IFD > 1)", method, len(kept), len(train), dropped)
    return Selection(method, keep, scores, tuple(kept), len(train), dropped, full_metrics.get("test", {}))


def compare_to_full(selection: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """Selected-subset model vs full-split model on the test split: did the selection help?"""
    out = {k: v for k, v in selection.items() if k != "full_test"}
    full = selection.get("full_test", {}).get("decision", {})
    sel = metrics.get("test", {}).get("decision", {})
    for m in ("precision", "recall", "f1"):
        out[f"full_{m}"] = full.get(m, {}).get("mean", math.nan)
        out[f"selected_{m}"] = sel.get(m, {}).get("mean", math.nan)
    out["f1_change"] = out["selected_f1"] - out["full_f1"]
    out["helped"] = bool(out["f1_change"] > 0)
    return out
