"""Fitting the gate (:class:`corefbot.models.serve.gate.Gate`): the shipped model and a deployment's retrain.

The shipped model is fitted on TASK's train split (``../shared/data/task_gecor.jsonl`` in a checkout) and the
train splits of our hand-written cases (``cases/``); their test splits are never fitted. ``zh_topics_referents.jsonl``
is not among them: it was written for the rewriter (which named thing a question means), and fitting it would move the
rules baseline every model figure is compared against. Rebuild it with
``python -m corefbot.models.train.gate [--shared ../shared/data] [--out models/serve/gate_model.json]``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from corefbot.models.serve.gate import DEFAULT_PATH, Gate
from corefbot.pipeline.records import Example

if TYPE_CHECKING:
    from corefbot.pipeline.store import Store

log = logging.getLogger(__name__)

CASES = Path(__file__).with_name("cases")
# Hand-written cases (tech troubleshooting; conversations about people, projects, papers, events); their
# "test" splits are never fitted.
OWN_DATA = tuple(CASES / f"{name}.jsonl" for name in ("zh_cases", "en_cases", "zh_topics", "en_topics"))
# ../shared/data beside a source checkout (models/train/ -> the repository's parent)
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def default_training_examples(shared: str | Path | None = None) -> list[Example]:
    """The shipped model's training rows: task_gecor's train split and the train splits of our own cases."""
    from corefbot.pipeline.examples import load_unified

    examples = [e for path in OWN_DATA if path.exists() for e in load_unified(path) if e.split == "train"]
    shared = Path(shared) if shared else SHARED_DATA
    task = shared / "task_gecor.jsonl"
    if task.exists():
        examples += load_unified(task, split="train")
    else:
        log.warning("%s is absent: training on the Chinese cases only", task)
    return examples


def train_from_store(store: "Store", *, base: bool = True, use_member: bool = True, **train_kwargs) -> Gate:
    """Retrain from the deployment's labels (moderators' and, with ``use_member``, members'), on top
    of the shipped training rows when ``base``. The caller saves it where ``Gate.load`` will find it."""
    from corefbot.pipeline.export import store_examples

    examples = store_examples(store, use_member=use_member)
    log.info("gate retraining with %d labelled questions from the store", len(examples))
    if base:
        examples = default_training_examples() + examples
    return Gate.train(examples, **train_kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m corefbot.models.train.gate", description="Train the shipped gate model.")
    parser.add_argument("--shared", help="folder holding task_gecor.jsonl (default ../shared/data)")
    parser.add_argument("--extra", nargs="*", default=[], help="more training files (unified or alpaca; all their rows)")
    parser.add_argument("--only", action="store_true",
                        help="train on the --extra files alone; the logged out-of-fold recall and specificity then say how "
                             "well this feature family separates that data when fitted on it (cross-validated by conversation)")
    parser.add_argument("--out", default=str(DEFAULT_PATH))
    parser.add_argument("--target-recall", type=float, default=0.99)
    args = parser.parse_args(argv)
    if args.only and not args.extra:
        parser.error("--only needs --extra FILE ...")
    if args.only and Path(args.out).resolve() == DEFAULT_PATH.resolve():
        parser.error("--only must not overwrite the shipped gate: give --out")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from corefbot.pipeline.examples import load_examples

    examples = [] if args.only else default_training_examples(args.shared)
    for path in args.extra:
        examples += load_examples(path)
    gate = Gate.train(examples, target_recall=args.target_recall)
    gate.save(args.out)
    log.info("wrote %s (%d weights, %d bytes)", args.out, len(gate.weights), Path(args.out).stat().st_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
