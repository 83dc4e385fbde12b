"""LoRA fine-tuning on a tiny real Qwen2 model on CPU: presets, data encoding, batching, the loss,
learning, LoRA+, and the self-describing run folder."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from corefbot.models.train.finetune import (FinetuneConfig, encode_examples, file_sha256, load_preset, make_batches)
from corefbot.pipeline.prompt import ALL_ORDERS, LETTERS, build_prompt
from corefbot.pipeline.records import Example, Turn

pytest.importorskip("peft")


def chat_examples(n: int, seed: int = 0, per_conv: int = 3) -> list[Example]:
    rng = random.Random(seed)
    words = "deploy install model error version driver build mmpose TensorRT CUDA docker".split()
    out = []
    for i in range(n):
        window = tuple(Turn(f"u{rng.randint(0, 3)}", " ".join(rng.choice(words) for _ in range(rng.randint(2, 12))),
                            float(t)) for t in range(rng.randint(0, 6)))
        needs = i % 2 == 0
        topic = rng.choice(words)
        out.append(Example(
            id=f"e{i}", conversation=f"c{i // per_conv}", window=window,
            question=Turn("u9", "how to fix it?" if needs else f"how to install {topic}?", 99.0),
            label="needs" if needs else "not_needed", rewrite=f"how to fix {topic}?" if needs else None))
    return out


def write_unified(path: Path, examples: list[Example]) -> Path:
    rows = [{"source": "t", "id": e.id.replace("e", "d") + "t0", "context": [t.text for t in e.window],
             "query": e.question.text, "needs_rewrite": e.label == "needs", "rewrite": e.rewrite or e.question.text}
            for e in examples]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_presets_carry_the_papers_settings(tmp_path: Path) -> None:
    paper = load_preset("paper")
    assert (paper.lora_r, paper.lora_alpha, paper.lora_dropout) == (64, 16, 0.05)
    assert paper.target_modules == "all-linear" and paper.learning_rate == 2e-4 and paper.epochs == 1
    assert (paper.lr_scheduler, paper.warmup_steps, paper.sequence_len) == ("cosine", 10, 1400)
    assert load_preset("paper-7b").lora_r == 16
    tiny = load_preset("tiny", max_steps=3)
    assert tiny.max_steps == 3 and tiny.preset == "tiny"
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_r: 8\nlearnin_rate: 1\n")
    with pytest.raises(ValueError, match="learnin_rate"):
        load_preset(str(bad))
    with pytest.raises(FileNotFoundError, match="no such preset"):
        load_preset("nonexistent")
    with pytest.raises(ValueError, match="option_orders 'shuffled' is not one of balanced, serve"):
        load_preset("seed-cpu", option_orders="shuffled")
    with pytest.raises(ValueError, match="lr_scheduler 'cosin' is not one of"):
        load_preset("tiny", lr_scheduler="cosin")
    assert FinetuneConfig.from_dict(paper.to_dict()) == paper
    # the CPU nightly preset is the seed recipe's training (one pass) with a test split big enough to promote on
    seed, nightly = load_preset("seed-cpu"), load_preset("nightly-cpu")
    assert (seed.epochs, nightly.epochs, seed.dtype, nightly.dtype) == (2, 1, "bfloat16", "bfloat16")
    assert seed.decision_weight == 8 and seed.option_orders == "serve" and nightly.split_fractions[2] >= 0.1
    same = ("preset", "split_fractions", "split_unit", "eval_max_examples", "epochs")
    assert nightly.replace(**{k: getattr(seed, k) for k in same}) == seed


def test_encoding_masks_exactly_the_response(tiny_hf: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf)
    exs = chat_examples(30)
    enc, dropped = encode_examples(exs, tok, seed=1)
    assert dropped == 0 and len(enc) == len(exs)
    letters = []
    for e, x in zip(enc, exs):
        response = tok.decode(list(e.ids[e.n_prompt:]))
        assert response.endswith("<|im_end|>")
        letters.append(response[0])
        assert response[0] in LETTERS
        # The prompt part is exactly the one prompt builder's text for some order.
        prompt_text = tok.decode(list(e.ids[: e.n_prompt]))
        assert prompt_text.startswith("<|im_start|>system") and prompt_text.endswith("assistant\n")
        if x.label == "needs":
            assert x.rewrite and response.split("\n")[1].startswith(x.rewrite[:5])
    # Option order balanced per letter: the correct letter lands on A, B and C equally often.
    assert {letters.count(L) for L in LETTERS} == {10}


def test_serve_order_training_renders_every_prompt_as_served(tiny_hf: Path) -> None:
    """option_orders "serve": every training prompt is the served prompt, so each decision has one letter."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf)
    exs = chat_examples(12)
    enc, _ = encode_examples(exs, tok, option_orders="serve")
    for e, x in zip(enc, exs):
        served = build_prompt(x.window, x.question)
        assert tok.decode(list(e.ids[: e.n_prompt])) == served.chatml()
        assert tok.decode(list(e.ids[e.n_prompt:])).startswith(served.letter(x.label))
    assert {tok.decode([e.ids[e.n_prompt]]) for e in enc} == {"A", "B"}
    with pytest.raises(ValueError, match="option_orders"):
        encode_examples(exs, tok, option_orders="shuffled")  # type: ignore[arg-type]
    short, dropped = encode_examples(exs, tok, sequence_len=40)
    assert dropped == len(exs) - len(short) and dropped > 0


def test_copy_unneeded_trains_the_question_after_the_needs_letter(tiny_hf: Path) -> None:
    """copy_unneeded: each "not_needed" example also yields the "needs" letter and the question copied, with the
    letter out of the loss: deciding by the rewrite reads that line, and a copy there means "nothing to resolve".
    fit() gives that letter weight 0: the first step's loss is the mean over the copied line's tokens only."""
    import torch
    import torch.nn.functional as F

    from corefbot.models.train.finetune import fit, setup

    session = setup(tiny_hf, load_preset("tiny", max_steps=1))
    tok = session.tokenizer
    exs = chat_examples(12)
    plain, _ = encode_examples(exs, tok, seed=1)
    enc, _ = encode_examples(exs, tok, seed=1, copy_unneeded=True)
    unneeded = [x for x in exs if x.label == "not_needed"]
    copies = [e for e in enc if e.letter_weight == 0.0]
    assert unneeded and len(enc) == len(plain) + len(unneeded) and len(copies) == len(unneeded)
    assert [e for e in enc if e.letter_weight is None] == plain
    by_id = {x.id: x for x in exs}
    for e in copies:
        x = by_id[e.example_id]
        prompt_text = tok.decode(list(e.ids[: e.n_prompt]))
        letter = next(build_prompt(x.window, x.question, o).letter("needs") for o in ALL_ORDERS
                      if build_prompt(x.window, x.question, o).chatml() in prompt_text)
        assert tok.decode(list(e.ids[e.n_prompt:])) == f"{letter}\n{x.question.text}<|im_end|>"

    copy = copies[0]
    ids = torch.tensor([copy.ids])
    with torch.no_grad():
        logits = session.model(input_ids=ids).logits[0, :-1].float()
    per_token = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    expected = float(per_token[copy.n_prompt:].mean())  # the response after its letter (position n_prompt)
    result = fit(session, [copy] * 16, progress=False)
    assert result.losses[0].loss == pytest.approx(expected, rel=1e-3)


def test_length_grouping_cuts_padding() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(20, 1400) for _ in range(512)]

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = make_batches(lengths, 4, seed=0, group_by_length=True)
    plain = make_batches(lengths, 4, seed=0, group_by_length=False)
    assert sorted(i for b in grouped for i in b) == list(range(512))
    assert padding(grouped) < padding(plain) / 5


def test_response_only_loss_equals_the_full_head_loss(tiny_hf: Path) -> None:
    """The head applied to response positions only gives the loss HF computes with masked labels, and the
    decision weight counts the answer's first token (the letter) that many times."""
    import torch
    import torch.nn.functional as F

    from corefbot.models.train.finetune import _response_loss_module, setup
    from corefbot.models.train.evaluate import pad

    session = setup(tiny_hf, load_preset("tiny"))
    enc, _ = encode_examples(chat_examples(4), session.tokenizer)
    ids, mask = pad([e.ids for e in enc], 0, "cpu")
    labels = torch.full_like(ids, -100)
    weights = torch.zeros_like(ids, dtype=torch.float32)
    for r, e in enumerate(enc):
        labels[r, e.n_prompt: len(e.ids)] = ids[r, e.n_prompt: len(e.ids)]
        weights[r, e.n_prompt: len(e.ids)] = 1.0
    loss = _response_loss_module(session.model)
    with torch.no_grad():
        ours = loss(ids, mask, weights) / int((weights > 0).sum())
        out = session.model(input_ids=ids, attention_mask=mask, labels=labels)
        assert float(ours) == pytest.approx(float(out.loss), rel=1e-4)
        per_token = F.cross_entropy(out.logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], reduction="none")
        letters = sum(float(per_token[r, e.n_prompt - 1]) for r, e in enumerate(enc))
        for r, e in enumerate(enc):
            weights[r, e.n_prompt] = 5.0
        weighted = loss(ids, mask, weights)
    assert float(weighted) == pytest.approx(float(per_token.sum()) + 4 * letters, rel=1e-4)


def test_shared_prefix_gives_the_same_loss_and_gradients(tiny_hf: Path) -> None:
    """Running the tokens every row opens with once for the batch (training's default) changes neither the
    loss nor the LoRA gradients; rows of different lengths, so padding and positions are exercised."""
    import torch

    from corefbot.models.train.evaluate import pad, shared_prefix
    from corefbot.models.train.finetune import _response_loss_module, setup

    session = setup(tiny_hf, load_preset("tiny", lora_layers=1))
    enc, _ = encode_examples(chat_examples(4), session.tokenizer)
    seqs = [e.ids for e in enc]
    assert len({len(s) for s in seqs}) > 1
    ids, mask = pad(seqs, 0, "cpu")
    weights = torch.zeros_like(ids, dtype=torch.float32)
    for r, e in enumerate(enc):
        weights[r, e.n_prompt: len(e.ids)] = 1.0
        weights[r, e.n_prompt] = 8.0
    shared = shared_prefix(seqs, min(e.n_prompt for e in enc) - 1)
    assert shared > 10  # the system text and the header
    loss = _response_loss_module(session.model).train()
    trained = [p for p in session.model.parameters() if p.requires_grad]

    def run(n: int) -> tuple[float, list[torch.Tensor]]:
        session.model.zero_grad(set_to_none=True)
        value = loss(ids, mask, weights, n)
        value.backward()
        return float(value.detach()), [p.grad.clone() for p in trained]

    plain, plain_grads = run(0)
    once, once_grads = run(shared)
    assert once == pytest.approx(plain, rel=1e-5)
    assert any(float(g.abs().max()) > 0 for g in plain_grads)
    for a, b in zip(plain_grads, once_grads):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)
    # One token further would put a loss position inside the shared part: the rows then differ there.
    assert shared_prefix(seqs, len(min(seqs, key=len))) <= min(e.n_prompt for e in enc)


@pytest.mark.slow
def test_fit_learns_and_loraplus_runs(tiny_hf: Path) -> None:
    from corefbot.models.train.finetune import fit, setup
    from corefbot.models.train.evaluate import response_losses

    exs = chat_examples(16)
    config = load_preset("tiny", learning_rate=1e-2, max_steps=25)
    session = setup(tiny_hf, config)
    data, _ = encode_examples(exs, session.tokenizer)
    items = [(d.ids, d.n_prompt) for d in data]
    before = sum(response_losses(session.model, session.tokenizer, items)) / len(items)
    result = fit(session, data, progress=False)
    after = sum(response_losses(session.model, session.tokenizer, items)) / len(items)
    assert after < 0.5 * before, (before, after)
    assert result.steps == 25 and len(result.losses) == 25
    assert result.losses[-1].loss < result.losses[0].loss
    assert result.tokens <= result.padded_tokens and result.tokens_per_s > 0 and result.peak_memory_bytes > 0
    # The schedule: warm-up then cosine decay to zero.
    lrs = [r.lr for r in result.losses]
    assert lrs[0] < lrs[1] and lrs[-1] == pytest.approx(0.0, abs=1e-9)

    plus = setup(tiny_hf, load_preset("tiny", loraplus_lr_ratio=16, max_steps=2))
    from corefbot.models.train.finetune import _optimizer

    lrs_plus = sorted({g["lr"] for g in _optimizer(plus.model, plus.config).param_groups})
    lr = plus.config.learning_rate
    assert any(v == pytest.approx(lr) for v in lrs_plus) and any(v == pytest.approx(16 * lr) for v in lrs_plus)
    assert fit(plus, data, progress=False).steps == 2


def test_training_continues_from_a_saved_adapter(tiny_hf: Path, tmp_path: Path) -> None:
    """init_adapter starts from a run's adapter (same losses as where it stopped, still trainable); an
    adapter of another shape is refused by name."""
    from corefbot.models.train.evaluate import response_losses
    from corefbot.models.train.finetune import fit, setup

    exs = chat_examples(8)
    first = setup(tiny_hf, load_preset("tiny", learning_rate=1e-2, max_steps=3))
    data, _ = encode_examples(exs, first.tokenizer)
    items = [(d.ids, d.n_prompt) for d in data]
    fit(first, data, progress=False)
    first.model.save_pretrained(tmp_path / "run" / "adapter")
    stopped = response_losses(first.model, first.tokenizer, items)

    config = load_preset("tiny", learning_rate=1e-2, max_steps=3, init_adapter=str(tmp_path / "run"))
    second = setup(tiny_hf, config)
    assert response_losses(second.model, second.tokenizer, items) == pytest.approx(stopped, rel=1e-4)
    assert second.trainable == first.trainable
    fit(second, data, progress=False)
    assert sum(response_losses(second.model, second.tokenizer, items)) < sum(stopped)  # it trains on

    with pytest.raises(ValueError, match=r"adapter has r 8.*asks for r 4"):
        setup(tiny_hf, config.replace(lora_r=4))
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        setup(tiny_hf, config.replace(init_adapter=str(tmp_path)))


def test_bfloat16_on_a_cpu_trains_where_the_cpu_multiplies_it(tiny_hf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU presets' dtype: bfloat16 weights with float32 LoRA weights where the CPU has bfloat16 instructions,
    float32 where it would only emulate them; the flags are read from /proc/cpuinfo's text."""
    import torch

    from corefbot.models.train import evaluate
    from corefbot.models.train.evaluate import cpu_has_native_bf16, response_losses
    from corefbot.models.train.finetune import fit, setup

    assert cpu_has_native_bf16("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_native_bf16("flags\t: fpu amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16("Features\t: fp asimd bf16 i8mm\n")  # aarch64
    assert not cpu_has_native_bf16("flags\t\t: fpu avx2 avx512f avx512bw\n")
    assert not cpu_has_native_bf16("")
    with pytest.raises(ValueError, match="dtype 'bf16' is not one of"):
        evaluate.torch_dtype_for("bf16", "cpu")

    exs = chat_examples(8)
    for native in (True, False):
        monkeypatch.setattr(evaluate, "cpu_has_native_bf16", lambda native=native: native)
        session = setup(tiny_hf, load_preset("tiny", learning_rate=1e-2, max_steps=4, dtype="bfloat16"))
        weights = {n: p.dtype for n, p in session.model.named_parameters()}
        assert {d for n, d in weights.items() if "lora_" in n} == {torch.float32}
        assert {d for n, d in weights.items() if "lora_" not in n} == {torch.bfloat16 if native else torch.float32}
        data, _ = encode_examples(exs, session.tokenizer)
        items = [(d.ids, d.n_prompt) for d in data]
        before = sum(response_losses(session.model, session.tokenizer, items))
        fit(session, data, progress=False)
        assert sum(response_losses(session.model, session.tokenizer, items)) < before


def test_a_further_sitting_can_add_layers(tiny_hf: Path, tmp_path: Path) -> None:
    """An adapter on the top layer continues on every layer: the same function at the start (the added
    layers' LoRA starts at zero), more trainable weights, and it trains; dropping a layer is refused."""
    from corefbot.models.train.evaluate import response_losses
    from corefbot.models.train.finetune import fit, setup

    exs = chat_examples(8)
    top = setup(tiny_hf, load_preset("tiny", learning_rate=1e-2, max_steps=3, lora_layers=1))
    data, _ = encode_examples(exs, top.tokenizer)
    items = [(d.ids, d.n_prompt) for d in data]
    fit(top, data, progress=False)
    top.model.save_pretrained(tmp_path / "run" / "adapter")
    stopped = response_losses(top.model, top.tokenizer, items)

    config = load_preset("tiny", learning_rate=1e-2, max_steps=3, lora_layers=2, init_adapter=str(tmp_path / "run"))
    wide = setup(tiny_hf, config)
    assert response_losses(wide.model, wide.tokenizer, items) == pytest.approx(stopped, rel=1e-4)
    assert wide.trainable == 2 * top.trainable
    fit(wide, data, progress=False)
    assert sum(response_losses(wide.model, wide.tokenizer, items)) < sum(stopped)
    bottom = wide.model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert bottom.abs().sum() > 0  # the added layer learned too

    wide.model.save_pretrained(tmp_path / "wide" / "adapter")
    assert wide.model.peft_config["default"].layers_to_transform is None  # every layer: the preset's adapter
    with pytest.raises(ValueError, match=r"layers all.*asks for .*layers \[1\]"):
        setup(tiny_hf, config.replace(lora_layers=1, init_adapter=str(tmp_path / "wide")))

    # A run that listed every layer one by one (as `--lora-layers 24` saved them) continues as the preset's adapter.
    saved = tmp_path / "wide" / "adapter" / "adapter_config.json"
    saved.write_text(json.dumps(dict(json.loads(saved.read_text()), layers_to_transform=[0, 1])))
    again = setup(tiny_hf, config.replace(lora_layers=None, init_adapter=str(tmp_path / "wide")))
    assert again.model.peft_config["default"].layers_to_transform is None
    assert response_losses(again.model, again.tokenizer, items) == pytest.approx(
        response_losses(wide.model, wide.tokenizer, items), rel=1e-4)


@pytest.mark.slow
def test_run_writes_a_self_describing_folder(tiny_hf: Path, tmp_path: Path) -> None:
    from corefbot.models.train.run import read_run, run, run_split

    data = write_unified(tmp_path / "labels.jsonl", chat_examples(90))
    config = load_preset("tiny", max_steps=4, eval_max_examples=12, rewrite_max_new_tokens=4)
    result = run(tiny_hf, data, tmp_path / "run", config, progress=False)
    out = result.out
    for name in ("config.yaml", "manifest.json", "metrics.json", "loss.csv", "loss.png",
                 "adapter/adapter_config.json", "tokenizer/tokenizer.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    cfg, manifest, metrics = read_run(out)
    assert cfg["base"] == str(tiny_hf.resolve()) and cfg["lora_r"] == config.lora_r
    assert manifest["data_sha256"] == file_sha256(data)
    with open(out / "loss.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    decision = metrics["test"]["decision"]
    for m in ("precision", "recall", "f1"):
        assert 0.0 <= decision[m]["mean"] <= 1.0 and decision[m]["std"] >= 0.0
    assert decision["orders"] == 6
    # Nothing held out was trained on, and the split is rebuilt identically from the manifest.
    split, _ = run_split(out)
    held = set(manifest["split_ids"]["test"]) | set(manifest["split_ids"]["validation"])
    assert held and manifest["trained_on"]["examples"] == len(split.train)
    assert not held & set(manifest["split_ids"]["train"])
    assert metrics["train"]["steps"] == 4


def test_selection_scores_and_top_share() -> None:
    import math

    from corefbot.models.train.selection import ifd, learnability, top_share

    assert learnability(2.0, 0.5) == pytest.approx(0.75)
    assert learnability(2.0, 3.0) == pytest.approx(-0.5)
    assert ifd(1.0, 2.0) == pytest.approx(0.5) and ifd(3.0, 2.0) > 1
    exs = chat_examples(10)
    scores = {e.id: float(i) for i, e in enumerate(exs)}
    assert [e.id for e in top_share(exs, scores, 0.3)] == ["e7", "e8", "e9"]
    scores["e8"] = math.nan
    kept = top_share(exs, scores, 0.3, drop_above=8.5)  # e9 is above the cap, e8 unscored
    assert [e.id for e in kept] == ["e5", "e6", "e7"]
    with pytest.raises(ValueError, match="share"):
        top_share(exs, scores, 0.0)


@pytest.mark.slow
def test_select_ifd_trains_on_the_top_share_and_reports(tiny_hf: Path, tmp_path: Path) -> None:
    import math

    from corefbot.models.train.run import run
    from corefbot.models.train.evaluate import load_model
    from corefbot.models.train.selection import answer_losses

    exs = chat_examples(60, seed=5)
    model, tok = load_model(tiny_hf)
    given = answer_losses(model, tok, exs[:6], seed=0)
    alone = answer_losses(model, tok, exs[:6], seed=0, with_instruction=False)
    assert set(given) == set(alone) == {e.id for e in exs[:6]}
    assert all(math.isfinite(v) and v > 0 for v in [*given.values(), *alone.values()])

    data = write_unified(tmp_path / "labels.jsonl", exs)
    config = load_preset("tiny", max_steps=3, eval_max_examples=8, eval_rewrites=False)
    result = run(tiny_hf, data, tmp_path / "run", config, select="ifd", keep=0.5, progress=False)
    sel = result.metrics["selection"]
    manifest = json.loads((result.out / "manifest.json").read_text())
    n_train = len(manifest["split_ids"]["train"])
    assert sel["method"] == "ifd" and sel["candidates"] == n_train
    assert sel["kept"] == min(round(0.5 * n_train), n_train - sel["dropped_ifd_over_1"])
    assert manifest["trained_on"]["examples"] == sel["kept"]
    assert isinstance(sel["helped"], bool) and sel["f1_change"] == pytest.approx(sel["selected_f1"] - sel["full_f1"])
    rows = list(csv.DictReader(open(result.out / "selection" / "ifd_scores.csv")))
    assert len(rows) == n_train and sum(int(r["kept"]) for r in rows) == sel["kept"]
