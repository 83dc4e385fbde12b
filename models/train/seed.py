"""The seed recipe: a day-one adapter from public labelled sets, so a new deployment is not zero-shot.

``corefbot seed --base BASE --out RUN`` (see ``bot/commands/train.py``):

1. :func:`build_seed_data` cuts every set into a training part and a held-out part by a fixed rule that
   never looks at the model (below), and writes ``RUN/seed-data/train.jsonl`` (a capped, deterministic
   sample of the training parts) and ``RUN/seed-data/heldout-<set>.jsonl``;
2. :func:`corefbot.models.train.run.run` fine-tunes on ``train.jsonl`` with the ``seed-cpu`` preset and
   a ``--max-minutes`` budget;
3. :func:`heldout_figures` evaluates the result on each held-out set separately (a deterministic subset
   of ``per_set`` examples: all six option orders for the decision, greedy rewrites) next to ``rules``
   and the question as asked.

Held-out rules (fixed, by id, so they hold for every run and every model):

- TASK: its own split (dialogue id ≥ 540 is ``dev``): dev is held out;
- CANARD dev: a conversation is held out when the SHA-256 of its id falls in the lowest 30%;
- REWRITE (Chinese): a pair (``rwN`` and ``rwN_neg``) is held out when the SHA-256 of ``rwN`` falls in
  the lowest 10%; the negative of a training pair is the training pair's rewrite, so pairs stay together;
- our hand-written cases (``models/train/cases``): their ``split`` field (``test`` is held out).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from corefbot.pipeline.records import Example

if TYPE_CHECKING:
    from corefbot.models.serve.types import DecideBy, DecideSetting
    from corefbot.models.train.evaluate_gguf import Engine

log = logging.getLogger(__name__)

CASES_DIR = Path(__file__).with_name("cases")


def _share(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _canard_held(row: dict) -> bool:
    return _share("canard:" + str(row["id"]).rsplit("_q", 1)[0]) < 0.3


def _rewrite_held(row: dict) -> bool:
    rid = str(row["id"])
    return _share("rewrite:" + (rid[:-4] if rid.endswith("_neg") else rid)) < 0.1


@dataclass(frozen=True, slots=True)
class SeedSet:
    """One labelled set: where it is, its language, which rows are held out, and how many to train on."""

    name: str
    file: str  # relative to the data folder (``cases/…`` for ours)
    lang: str
    held_out: Callable[[dict], bool]
    train_cap: int | None  # a deterministic sample of the training part; None: all of it
    # Further files of the same set, read after ``file`` under the same held-out rule: rows written for the rewriter
    # only, which the gate and the rules baseline (fitted on ``file``) never see.
    more: tuple[str, ...] = ()


SEED_SETS: tuple[SeedSet, ...] = (
    SeedSet("task", "task_gecor.jsonl", "en", lambda r: r.get("split") != "train", 500),
    SeedSet("canard", "canard_dev.jsonl", "en", _canard_held, 250),
    SeedSet("rewrite_zh", "rewrite_zh_train.jsonl", "zh", _rewrite_held, 3000),
    SeedSet("cases_en", "cases/en_cases.jsonl", "en", lambda r: r.get("split") == "test", None),
    SeedSet("topics_en", "cases/en_topics.jsonl", "en", lambda r: r.get("split") == "test", None),
    SeedSet("cases_zh", "cases/zh_cases.jsonl", "zh", lambda r: r.get("split") == "test", None),
    SeedSet("topics_zh", "cases/zh_topics.jsonl", "zh", lambda r: r.get("split") == "test", None,
            more=("cases/zh_topics_referents.jsonl",)),
)


@dataclass(frozen=True)
class SeedData:
    train: Path
    heldout: dict[str, Path]
    counts: dict[str, dict[str, int]]  # set → {"train": rows written, "train_available", "heldout"}


def _paths_of(s: SeedSet, data_dir: Path) -> list[Path]:
    return [CASES_DIR / f.split("/", 1)[1] if f.startswith("cases/") else data_dir / f for f in (s.file, *s.more)]


def _unit(row: dict) -> str:
    """What must stay together when sampling: a pair, or a dialogue's turns are sampled as one."""
    rid = str(row["id"])
    for suffix in ("_neg", "_coref", "_complete"):
        if rid.endswith(suffix):
            return rid[: -len(suffix)]
    return rid


def with_caps(caps: Mapping[str, int], sets: Sequence[SeedSet] = SEED_SETS) -> tuple[SeedSet, ...]:
    """``sets`` with the training caps in ``caps`` (set name → rows) changed; an unknown name or a cap under 1
    is an error naming it."""
    names = {s.name for s in sets}
    for name, cap in caps.items():
        if name not in names:
            raise ValueError(f"no seed set {name!r} (the sets: {', '.join(sorted(names))})")
        if cap < 1:
            raise ValueError(f"the cap of seed set {name!r} must be 1 or more, not {cap}")
    return tuple(replace(s, train_cap=caps[s.name]) if s.name in caps else s for s in sets)


def build_seed_data(data_dir: str | Path, out: str | Path, *,
                    sets: Sequence[SeedSet] = SEED_SETS, sample: int = 0) -> SeedData:
    """Write ``out/train.jsonl`` and ``out/heldout-<set>.jsonl``; a missing public file is an error naming it.
    ``sample``: which of the capped sets' successive samples to train on (0: the first ``train_cap`` rows in
    the hash order, 1: the next ones …), so a further sitting sees fresh pairs; uncapped sets are whole in
    every sample. The held-out parts never change."""
    if sample < 0:
        raise ValueError(f"sample must be 0 or more, not {sample}")
    from corefbot.pipeline.examples import read_jsonl

    data_dir, out = Path(data_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_rows: list[dict] = []
    heldout: dict[str, Path] = {}
    counts: dict[str, dict[str, int]] = {}
    for s in sets:
        rows: list[dict] = []
        for path in _paths_of(s, data_dir):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: seed set {s.name!r} is missing (see shared/data/README.md)")
            rows += [row for _, row in read_jsonl(path)]
        held = [r for r in rows if s.held_out(r)]
        train = [r for r in rows if not s.held_out(r)]
        if s.train_cap is not None and len(train) > s.train_cap:
            # Whole units by a hash of their id: deterministic, and pairs are never split.
            ranked = sorted({_unit(r) for r in train}, key=lambda u: _share(f"{s.name}:{u}"))
            keep: set[str] = set()
            n = 0
            by_unit: dict[str, int] = {}
            for r in train:
                by_unit[_unit(r)] = by_unit.get(_unit(r), 0) + 1
            for u in ranked:
                if n >= s.train_cap * (sample + 1):
                    break
                if n >= s.train_cap * sample:
                    keep.add(u)
                n += by_unit[u]
            picked = [r for r in train if _unit(r) in keep]
        else:
            picked = train
        train_rows += picked
        hp = out / f"heldout-{s.name}.jsonl"
        hp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in held), encoding="utf-8")
        heldout[s.name] = hp
        counts[s.name] = {"train": len(picked), "train_available": len(train), "heldout": len(held)}
    tp = out / "train.jsonl"
    tp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train_rows), encoding="utf-8")
    (out / "seed-data.json").write_text(json.dumps(
        {"data_dir": str(data_dir.resolve()), "sample": sample, "counts": counts,
         "caps": {s.name: s.train_cap for s in sets},
         "rules": {"task": "split != train", "canard": "sha256('canard:'+conversation) < 30%",
                   "rewrite_zh": "sha256('rewrite:'+pair id) < 10%", "cases": "split == test"}},
        indent=2))
    return SeedData(tp, heldout, counts)


# ---- figures -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SetFigures:
    """One held-out set, one model: decisions over all option orders, rewrites, and the two baselines."""

    name: str
    lang: str
    examples: int
    needs: int
    model: dict[str, Any]  # evaluate.evaluate(...) summary: decision stats over orders, rewrite
    rules: dict[str, Any]  # eval_resolver.score(...) of the rules backend on the same examples
    as_asked: dict[str, float]  # the question forwarded unchanged: exact match and token F1
    # eval_resolver.score(...) of the whole served resolver (gate, the model in the bot's default decide mode,
    # rewrite validation): the decision and the question forwarded, as the group sees them. None: not asked.
    served: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lang": self.lang, "examples": self.examples, "needs": self.needs,
                "model": self.model, "rules": self.rules, "as_asked": self.as_asked, "served": self.served}


def as_asked(examples: Sequence[Example]) -> dict[str, float]:
    import statistics

    from corefbot.pipeline.metrics import exact_match, token_f1

    needs = [e for e in examples if e.label == "needs" and e.rewrite]
    if not needs:
        return {"n": 0, "exact_match": float("nan"), "token_f1": float("nan")}
    return {"n": len(needs),
            "exact_match": statistics.fmean(exact_match(e.question.text, e.rewrite or "") for e in needs),
            "token_f1": statistics.fmean(token_f1(e.question.text, e.rewrite or "") for e in needs)}


def heldout_figures(model: str | Path, heldout: dict[str, Path], *, per_set: int = 60, rewrites: bool = True,
                    max_new_tokens: int = 40, progress: bool = False, engine: "Engine" = "auto",
                    n_threads: int | None = None, decide_by: "DecideBy" = "letter",
                    served: bool = False, served_decide_by: "DecideSetting" = "auto") -> list[SetFigures]:
    """Evaluate ``model`` (a run folder, a Hugging Face folder or a GGUF) on each held-out set, under PyTorch
    or, as served, under llama.cpp (``engine``: see :func:`corefbot.models.train.evaluate_gguf.pick_engine`).
    ``served``: also the bot's whole resolver over it (:class:`SetFigures` ``served``), deciding as
    ``served_decide_by`` says (``auto``: the run's measured mode, as the bot does by default)."""
    from contextlib import ExitStack

    from corefbot.models.train.evaluate import evaluate, load_model
    from corefbot.models.train.evaluate_gguf import evaluate_gguf, open_backend, pick_engine
    from corefbot.models.train.finetune import subset
    from corefbot.pipeline.examples import load_examples

    out: list[SetFigures] = []
    langs = {s.name: s.lang for s in SEED_SETS}
    with ExitStack() as stack:
        if pick_engine(model, engine) == "llama":
            backend = stack.enter_context(open_backend(model, n_threads, decide_by))

            def report_of(examples: list[Example]) -> dict[str, Any]:
                return evaluate_gguf(backend, examples, rewrites=rewrites, progress=progress)
        else:
            if decide_by != "letter":
                raise ValueError("deciding by the rewrite is a served (llama.cpp) mode: use engine 'llama'")
            hf, tok = load_model(model, device="cpu")

            def report_of(examples: list[Example]) -> dict[str, Any]:
                return evaluate(hf, tok, examples, rewrites=rewrites, max_new_tokens=max_new_tokens,
                                progress=progress)

        for name, path in heldout.items():
            examples = subset(load_examples(path), per_set)
            if not examples:
                continue
            log.info("held-out %s: %d examples", name, len(examples))
            row = _set_figures(name, langs.get(name, "?"), examples, report_of(examples))
            if served:
                row = replace(row, served=_served(model, examples, n_threads, served_decide_by))
            out.append(row)
    return out


def _served(model: str | Path, examples: list[Example], n_threads: int | None,
            decide_by: "DecideSetting" = "auto") -> dict[str, Any]:
    """The bot's resolver with its default settings (deciding as ``decide_by`` says) over ``examples``: what a
    group member would see."""
    from corefbot.models.train.eval_resolver import evaluate as eval_backend

    report = eval_backend(examples, "llama-cpp", model_path=str(model), n_threads=n_threads, progress=False,
                          decide_by=decide_by)
    return {"decide_by": report["decide_by"], "decision": report["decision"],
            "rewrite": report["rewrite"], "gate": report["gate"], "latency_ms": report["latency_ms"],
            "mistakes": report["mistakes"], "rewrite_misses": report["rewrite_misses"]}


def _set_figures(name: str, lang: str, examples: list[Example], report: dict[str, Any]) -> SetFigures:
    """One set's row: the model's report beside the rules backend and the question as asked."""
    from corefbot.models.train.eval_resolver import evaluate as eval_backend

    rules = eval_backend(examples, "rules", progress=False)
    return SetFigures(name, lang, len(examples), sum(e.label == "needs" for e in examples), report,
                      {"decision": rules["decision"], "rewrite": rules["rewrite"]}, as_asked(examples))


def format_served(rows: Sequence[SetFigures]) -> str:
    """The served resolver's table (rows evaluated with ``served``): decision and forwarded question."""
    head = ("| set | n (needs) | decides by | P | R | F1 | Matthews | rules Matthews | forwarded EM | forwarded token F1 "
            "| rules token F1 | as-asked token F1 | sent to the model |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.served is None:
            continue
        d, rw = r.served["decision"], r.served["rewrite"]
        lines.append(
            f"| {r.name} ({r.lang}) | {r.examples} ({r.needs}) | {r.served['decide_by']} | {d['precision']:.3f} | "
            f"{d['recall']:.3f} | {d['f1']:.3f} | {d['mcc']:.3f} | {r.rules['decision']['mcc']:.3f} | "
            f"{rw['exact_match']:.3f} | {rw['token_f1']:.3f} | {r.rules['rewrite']['token_f1']:.3f} | "
            f"{r.as_asked['token_f1']:.3f} | {r.served['gate']['sent_rate']:.3f} |")
    return "\n".join(lines)


def format_figures(rows: Sequence[SetFigures], model_name: str = "model") -> str:
    """The figures table: per set, the model's decisions (mean ± spread over orders) and rewrites, rules, as asked."""
    def ms(stat: dict[str, float]) -> str:
        return f"{stat['mean']:.3f}±{stat['std']:.3f}"

    def f(x: float | None) -> str:
        return "n/a" if x is None or x != x else f"{x:.3f}"

    head = (f"| set | n (needs) | {model_name} P | R | F1 | Matthews | rules F1 | rules Matthews | "
            f"{model_name} EM | token F1 | rules EM | rules token F1 | as-asked EM | as-asked token F1 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        d = r.model["decision"]
        rw = r.model.get("rewrite", {})
        rd, rr = r.rules["decision"], r.rules["rewrite"]
        lines.append(
            f"| {r.name} ({r.lang}) | {r.examples} ({r.needs}) | {ms(d['precision'])} | {ms(d['recall'])} | "
            f"{ms(d['f1'])} | {ms(d['mcc'])} | {f(rd['f1'])} | {f(rd['mcc'])} | "
            f"{f(rw.get('exact_match'))} | {f(rw.get('token_f1'))} | {f(rr['exact_match'])} | {f(rr['token_f1'])} | "
            f"{f(r.as_asked['exact_match'])} | {f(r.as_asked['token_f1'])} |")
    return "\n".join(lines)
