"""LoRA supervised fine-tuning on labelled examples, as plain functions: setup → fit → validate → save.

Hyper-parameters come from the paper's axolotl configs (YAML presets in ``models/presets``): r 64
(16 for 7B), alpha 16, dropout 0.05, every linear layer, lr 2e-4, one epoch, cosine schedule, 10
warm-up steps, loss on the response tokens only, sequences up to 1400 tokens (longer ones are
dropped and counted, as axolotl does). LoRA+ (a larger learning rate for the B matrices) is an option.

The loop is plain torch driven by ``accelerate``: one process on a CPU or a GPU as it is, several
GPUs when started with ``accelerate launch`` or ``torchrun`` (each process takes every n-th batch;
gradients are averaged by DDP). It is faster than ``transformers.Trainer`` on the same data for two
reasons: batches are grouped by length (little padding), and the vocabulary projection runs only on
the response positions instead of every position of the prompt.

Every run folder is self-describing: ``config.yaml``, ``manifest.json`` (data file hash, split,
counts), ``tokenizer/``, ``adapter/``, ``loss.csv``, ``loss.png``, ``metrics.json``.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence, get_args

from corefbot.pipeline.prompt import SERVE_ORDER, balanced_orders, build_prompt, target
from corefbot.pipeline.records import Example
from corefbot.models.train.base import file_sha256  # noqa: F401 - re-exported: run folders hash their data
from corefbot.models.train.evaluate import decoder_and_head, encode, pick_device, shared_prefix, torch_dtype_for
from corefbot.models.train.split import Split, assert_no_leak

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).with_name("presets")
SelectMethod = Literal["lobass", "ifd"]
Scheduler = Literal["cosine", "linear", "constant"]
OptionOrders = Literal["balanced", "serve"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a run depends on besides the base model and the data (both recorded too)."""

    preset: str = "custom"
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    # Adapt only the last N decoder layers (None: all). On a CPU the backward pass then stops N layers
    # from the top, so a step costs about (1 + N/L) / 3 of a full-depth one for L layers.
    lora_layers: int | None = None
    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    # Wall-clock budget for the optimizer steps (evaluation and saving come after it): training stops at
    # the first step boundary where another step would overrun it, and the schedule is re-fitted to the
    # steps the budget allows, so the learning rate still decays to its end. None: no budget.
    max_minutes: float | None = None
    warmup_steps: int = 10
    lr_scheduler: Scheduler = "cosine"
    sequence_len: int = 1400
    micro_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loraplus_lr_ratio: float | None = None  # e.g. 16: LoRA+ (B matrices learn that much faster)
    group_by_length: bool = True
    gradient_checkpointing: bool = False
    # Compute the tokens every sequence of a micro-batch opens with (the system text and the header, about
    # 90 of a seed example's ~150) once and share their keys and values across the batch, instead of
    # once per sequence. The loss and its gradients are the same (up to float rounding; LoRA dropout then
    # draws one mask for the shared part). Not with gradient checkpointing, which turns the cache off.
    share_prefix: bool = True
    device: str = "auto"  # auto: cuda when present, else cpu
    # auto: bfloat16 on a GPU that has it, else float32. bfloat16 on a CPU without bfloat16 instructions
    # trains in float32 (emulated bfloat16 is slower).
    dtype: str = "auto"
    seed: int = 0
    split_seed: int = 0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_unit: str = "auto"  # conversation | day | auto (corefbot.models.train.split.Unit)
    eval_rewrites: bool = True
    eval_base: bool = False  # also evaluate the untouched base on the test split (Table 2's "before")
    eval_max_examples: int | None = None  # cap per evaluated split (a deterministic subset); None = all
    rewrite_max_new_tokens: int = 48
    # How many times the answer's first token (the decision letter) counts in the loss. With a rewrite of
    # ~20 tokens behind it the letter is ~5% of the signal, and a short CPU run learned the rewrites while
    # its decisions stayed at chance; weighting the letter gives the decision a share of the gradient.
    decision_weight: float = 1.0
    # Continue training this adapter (a run folder or its adapter/ folder) instead of a fresh one: a second
    # epoch on a CPU, or a nightly run that starts from the promoted adapter. Its r, alpha and layers must
    # be this config's, so that the run folder's config.yaml stays true.
    init_adapter: str | None = None
    # Also train, for each question that needs nothing, the question itself as the line after the "needs"
    # letter (the letter not in the loss). Deciding by the rewrite forces that letter and reads the line:
    # trained on rewrites only, a model learned that the line after it always changes the question, and
    # rewrote self-contained questions with words from the chat (models/EXPERIMENTS.md).
    copy_unneeded: bool = False
    # The option order of the training prompts. "balanced": shuffled so the right letter lands on A, B and C
    # equally often (the paper's setting; the model must read the options). "serve": always the order the
    # bot serves in (SERVE_ORDER), so the letter is a fixed class token: after a CPU sitting of ~300 steps
    # a balanced-order adapter still answered by position (models/EXPERIMENTS.md). Evaluation over all six
    # orders then measures how much the model relies on that position.
    option_orders: OptionOrders = "balanced"

    def replace(self, **changes: Any) -> "FinetuneConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["split_fractions"] = list(self.split_fractions)
        if isinstance(self.target_modules, tuple):
            d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "FinetuneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{where}: unknown finetune setting(s) {', '.join(unknown)}")
        # Checked here, not where training first reads them: a preset's typo should not surface minutes later,
        # after the base has been loaded.
        for name, kind in (("lr_scheduler", Scheduler), ("option_orders", OptionOrders)):
            if name in data and data[name] not in get_args(kind):
                raise ValueError(f"{where}: {name} {data[name]!r} is not one of {', '.join(get_args(kind))}")
        data = dict(data)
        if "split_fractions" in data:
            data["split_fractions"] = tuple(data["split_fractions"])
        if isinstance(data.get("target_modules"), list):
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)


def load_preset(name_or_path: str, **overrides: Any) -> FinetuneConfig:
    """A preset by name (``paper``, ``tiny``, ``paper-7b``) or a YAML file path, with overrides."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"{path}: no such preset (known presets: {known})")
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("preset", path.stem)
    data.update({k: v for k, v in overrides.items() if v is not None})
    if data.get("init_adapter"):
        # The run folder records the adapter it continued; a relative path would not name it from elsewhere.
        data["init_adapter"] = str(Path(data["init_adapter"]).resolve())
    return FinetuneConfig.from_dict(data, str(path))


# ---- data ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Encoded:
    """One training sequence: prompt + response token ids; the loss covers ids[n_prompt:]."""

    example_id: str
    ids: tuple[int, ...]
    n_prompt: int
    letter_weight: float | None = None  # the answer's first token's weight; None: the config's decision_weight


def encode_examples(examples: Sequence[Example], tokenizer: Any, *, seed: int = 0,
                    sequence_len: int | None = None, copy_unneeded: bool = False,
                    option_orders: OptionOrders = "balanced") -> tuple[list[Encoded], int]:
    """Render each example once, in an option order balanced per letter (as the alpaca export does) or in
    the serving order, with the target response; returns the sequences and how many were dropped as too long.
    ``copy_unneeded``: also a sequence per "not_needed" example whose response is the "needs" letter (weight
    0) and the question copied (:attr:`FinetuneConfig.copy_unneeded`)."""
    if option_orders == "serve":
        orders = [SERVE_ORDER] * len(examples)
    elif option_orders == "balanced":
        orders = balanced_orders([e.label for e in examples], seed)
    else:
        raise ValueError(f"option_orders: {option_orders!r} is neither 'balanced' nor 'serve'")
    out: list[Encoded] = []
    dropped = 0
    for e, order in zip(examples, orders):
        p = build_prompt(e.window, e.question, order)
        responses = [(target(p, e.label, e.rewrite), None)]
        if copy_unneeded and e.label == "not_needed":
            responses.append((target(p, "needs", e.question.text), 0.0))
        for response, letter_weight in responses:
            ids, n_prompt = encode(tokenizer, p.chatml(), response + "<|im_end|>")
            if sequence_len is not None and len(ids) > sequence_len:
                dropped += 1
                continue
            out.append(Encoded(e.id, tuple(ids), n_prompt, letter_weight))
    if dropped:
        log.warning("dropped %d of %d sequences longer than %s tokens", dropped, len(out) + dropped, sequence_len)
    return out, dropped


def make_batches(lengths: Sequence[int], micro_batch_size: int, *, seed: int, group_by_length: bool) -> list[list[int]]:
    """Micro-batches of indices. Grouped by length: shuffle, sort within mega-batches of 64
    micro-batches, cut, shuffle the batches (the same idea as Trainer's ``group_by_length``)."""
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if not group_by_length:
        return [idx[i:i + micro_batch_size] for i in range(0, len(idx), micro_batch_size)]
    mega = micro_batch_size * 64
    batches = []
    for start in range(0, len(idx), mega):
        chunk = sorted(idx[start:start + mega], key=lambda j: -lengths[j])
        batches += [chunk[i:i + micro_batch_size] for i in range(0, len(chunk), micro_batch_size)]
    rng.shuffle(batches)
    return batches


# ---- setup ---------------------------------------------------------------------------------------

@dataclass
class Session:
    """A base model with a fresh LoRA adapter, ready to train."""

    model: Any  # peft.PeftModel
    tokenizer: Any
    device: str
    base: Path
    config: FinetuneConfig
    accelerator: Any
    parameters: int = 0
    trainable: int = 0
    autocast: bool = False  # bfloat16 weights: the LoRA matmuls (float32 weights) in bfloat16 too


def setup(base: str | Path, config: FinetuneConfig) -> Session:
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = Path(base)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{base}: no config.json (not a Hugging Face model folder)")
    device = pick_device(config.device)
    dtype = torch_dtype_for(config.dtype, device)
    # Mixed precision is fit()'s own autocast, not Accelerate's: Accelerate's is fixed for the whole process at
    # its first Accelerator, and one process (the bot's nightly, the tests) may train in float32 and bfloat16.
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="no")
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    layers = None
    n_all = int(model.config.num_hidden_layers)
    if config.lora_layers:
        if not 0 < config.lora_layers <= n_all:
            raise ValueError(f"lora_layers must be between 1 and {n_all} for {base}, got {config.lora_layers}")
        # Every layer is the default adapter (layers None), so `--lora-layers N` with N the model's depth trains
        # the same adapter as the preset and its runs average and continue with the preset's.
        layers = list(range(n_all - config.lora_layers, n_all)) if config.lora_layers < n_all else None
    targets: str | list[str] = (list(config.target_modules) if isinstance(config.target_modules, tuple)
                                else config.target_modules)
    if layers is not None and targets == "all-linear":
        # peft takes layers_to_transform only with named modules: every linear layer inside the decoder layers.
        targets = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                          if isinstance(mod, torch.nn.Linear) and ".layers." in name})
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        layers_to_transform=layers,
        target_modules=targets,
        bias="none", task_type="CAUSAL_LM",
    )
    if config.init_adapter:
        from peft import PeftModel

        folder = adapter_folder(config.init_adapter)
        saved = json.loads((folder / "adapter_config.json").read_text())
        have = (saved.get("r"), saved.get("lora_alpha"), saved.get("layers_to_transform"))
        have_layers, want_layers = set(have[2] or range(n_all)), set(layers or range(n_all))
        if have[:2] != (config.lora_r, config.lora_alpha) or not have_layers <= want_layers:
            raise ValueError(f"{folder}: the adapter has r {have[0]}, alpha {have[1]}, layers {have[2] or 'all'}; "
                             f"the {config.preset} config asks for r {config.lora_r}, alpha {config.lora_alpha}, "
                             f"layers {layers or 'all'}: continue it with the preset it was trained with (or one "
                             "that adds layers)")
        if have[2] != layers:
            # More layers than the saved adapter: its weights where it has them, fresh LoRA (B = 0, so the
            # same function at the start) on the layers it adds. (Or the same layers listed one by one, as
            # `--lora-layers 24` once saved them: loaded the same way, so the new run's config is the preset's.)
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            model = get_peft_model(model, lora)
            loaded = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
            if loaded.unexpected_keys:
                raise ValueError(f"{folder}: {len(loaded.unexpected_keys)} adapter weights match no module of the "
                                 f"new adapter (e.g. {loaded.unexpected_keys[0]})")
            if have_layers != want_layers:
                log.info("widened %s from layers %s to %s", folder, have[2], layers or "all")
        else:
            model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    else:
        model = get_peft_model(model, lora)
    model.to(accelerator.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d on %s: %s trainable of %s parameters, device %s, %s", config.lora_r, base,
             f"{trainable:,}", f"{total:,}", accelerator.device, dtype)
    return Session(model, tokenizer, str(accelerator.device), base, config, accelerator, total, trainable,
                   autocast=dtype == torch.bfloat16)


def adapter_folder(path: str | Path) -> Path:
    """A peft adapter folder, given it or the run folder that holds it as ``adapter/``."""
    path = Path(path)
    for folder in (path, path / "adapter"):
        if (folder / "adapter_config.json").is_file():
            return folder
    raise FileNotFoundError(f"{path}: no adapter_config.json here or in {path / 'adapter'} "
                            "(not a peft adapter or a corefbot run folder)")


def _response_loss_module(model: Any) -> "torch.nn.Module":
    import torch
    import torch.nn.functional as F

    class ResponseLoss(torch.nn.Module):
        """Summed cross-entropy over response tokens; the head runs only where a target is."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, weights: torch.Tensor,
                    shared: int = 0):
            """``weights``: each token's weight in the loss, 0 outside the response. ``shared``: leading
            tokens identical in every row and outside the loss, run once for the whole batch."""
            body, head = decoder_and_head(self.inner)
            if shared:
                cache = body(input_ids=input_ids[:1, :shared], use_cache=True).past_key_values
                cache.batch_repeat_interleave(input_ids.shape[0])
                width = input_ids.shape[1]
                positions = torch.arange(shared, width, device=input_ids.device).expand(input_ids.shape[0], -1)
                hidden = body(input_ids=input_ids[:, shared:], attention_mask=attention_mask, position_ids=positions,
                              past_key_values=cache, use_cache=True).last_hidden_state
            else:
                hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            # hidden[:, j] is position shared + j and predicts the token after it.
            w = weights[:, shared + 1:]
            sel = w > 0
            logits = head(hidden[:, :-1][sel]).float()
            return (F.cross_entropy(logits, input_ids[:, shared + 1:][sel], reduction="none") * w[sel]).sum()

    return ResponseLoss(model)


# ---- fit -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossRow:
    step: int
    lr: float
    loss: float  # mean response-token loss of this optimizer step
    tokens: int  # cumulative non-padding tokens processed
    elapsed_s: float


@dataclass(frozen=True)
class FitResult:
    steps: int
    sequences: int
    tokens: int  # non-padding tokens processed (prompt + response), all epochs
    padded_tokens: int  # tokens including padding
    response_tokens: int
    wall_s: float
    peak_memory_bytes: int  # GPU: max allocated; CPU: the process's peak resident set
    losses: tuple[LossRow, ...] = field(default=())
    planned_steps: int = 0  # steps the epochs / max_steps asked for
    stopped_on_budget: bool = False  # max_minutes ended training before planned_steps

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "sequences": self.sequences, "tokens": self.tokens,
                "padded_tokens": self.padded_tokens, "response_tokens": self.response_tokens,
                "wall_s": self.wall_s, "tokens_per_s": self.tokens_per_s,
                "padding_share": 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0,
                "peak_memory_bytes": self.peak_memory_bytes,
                "final_loss": self.losses[-1].loss if self.losses else math.nan,
                "planned_steps": self.planned_steps or self.steps, "stopped_on_budget": self.stopped_on_budget}


class _Horizon:
    """The step count a budgeted schedule decays over; shrinks as the budget's reach becomes known."""

    def __init__(self, total: int) -> None:
        self.total = total


def _budget_scheduler(optimizer: Any, config: FinetuneConfig, horizon: _Horizon) -> Any:
    """Warm-up then cosine / linear / constant over ``horizon.total`` steps, read at every step, so
    a wall-clock budget that allows fewer steps than planned still ends with a decayed learning rate."""
    import torch

    def factor(step: int) -> float:
        total = max(1, horizon.total)
        warmup = min(config.warmup_steps, max(0, total - 1))
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if config.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _scheduler(optimizer: Any, config: FinetuneConfig, total_steps: int) -> Any:
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    warmup = min(config.warmup_steps, max(0, total_steps - 1))
    if config.lr_scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    if config.lr_scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def _optimizer(model: Any, config: FinetuneConfig) -> Any:
    import torch

    if config.loraplus_lr_ratio:
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=config.learning_rate,
                                         loraplus_lr_ratio=config.loraplus_lr_ratio,
                                         weight_decay=config.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def peak_memory_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def fit(session: Session, data: Sequence[Encoded], *, progress: bool = True) -> FitResult:
    """Train the session's adapter on ``data``; returns throughput, memory and the loss curve."""
    import torch
    from tqdm import tqdm

    config, acc = session.config, session.accelerator
    if not data:
        raise ValueError("no training sequences (every example was dropped or the split is empty)")
    lengths = [len(d.ids) for d in data]
    per_epoch = math.ceil(len(data) / config.micro_batch_size)
    accum = config.gradient_accumulation_steps
    if config.max_steps:
        total_steps = config.max_steps
    else:
        total_steps = max(1, math.ceil(per_epoch * config.epochs / accum / acc.num_processes))
    optimizer = _optimizer(session.model, config)
    horizon = _Horizon(total_steps)
    budget_s = config.max_minutes * 60 if config.max_minutes else None
    if budget_s is not None and budget_s <= 0:
        raise ValueError(f"max_minutes must be positive, got {config.max_minutes}")
    scheduler = (_budget_scheduler(optimizer, config, horizon) if budget_s is not None
                 else _scheduler(optimizer, config, total_steps))
    wrapper = _response_loss_module(session.model)
    # The scheduler stays unwrapped: total_steps already counts this process's optimizer steps, and
    # accelerate's wrapper would step it once per process.
    wrapper, optimizer = acc.prepare(wrapper, optimizer)
    wrapper.train()
    pad_id = session.tokenizer.pad_token_id if session.tokenizer.pad_token_id is not None else 0
    if session.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def micro_batches():
        epoch = 0
        while True:
            batches = make_batches(lengths, config.micro_batch_size, seed=config.seed + epoch,
                                   group_by_length=config.group_by_length)
            # Each process takes every n-th batch; equal counts so no process waits on a missing step.
            usable = len(batches) - len(batches) % acc.num_processes if acc.num_processes > 1 else len(batches)
            yield from batches[acc.process_index:usable:acc.num_processes]
            epoch += 1

    stream = micro_batches()
    rows: list[LossRow] = []
    tokens = padded = response = sequences = 0
    start = time.perf_counter()
    bar = tqdm(total=total_steps, desc="training", unit="step", disable=not progress or not acc.is_main_process)
    steps_done = 0
    stopped_on_budget = False

    share = config.share_prefix and not config.gradient_checkpointing

    def letter_weight(i: int) -> float:
        w = data[i].letter_weight
        return config.decision_weight if w is None else w

    for step in range(1, total_steps + 1):
        if budget_s is not None and steps_done:
            elapsed = time.perf_counter() - start
            per_step = elapsed / steps_done
            # Stop before a step that would overrun the budget (every step is about as long as the mean).
            if elapsed + per_step > budget_s:
                stopped_on_budget = True
                log.warning("stopping after %d of %d steps: the %.1f-minute budget is spent (%.0f s per step)",
                            steps_done, total_steps, config.max_minutes, per_step)
                break
            reach = steps_done + int((budget_s - elapsed) / per_step)
            horizon.total = max(steps_done + 1, min(total_steps, reach))
        group = [next(stream) for _ in range(accum)]
        # Normalise by the response tokens of the whole optimizer step, so a micro-batch with more
        # answer tokens weighs more (a token mean, as with one large batch).
        n_targets = sum(len(data[i].ids) - max(1, data[i].n_prompt) + letter_weight(i) - 1 for b in group for i in b)
        step_loss = 0.0
        for k, batch in enumerate(group):
            seqs = [data[i].ids for i in batch]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            weights = torch.zeros((len(seqs), width), dtype=torch.float32)
            for r, i in enumerate(batch):
                s = data[i].ids
                first = max(1, data[i].n_prompt)
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
                weights[r, first: len(s)] = 1.0
                weights[r, first] = letter_weight(i)
            ids, mask, weights = ids.to(acc.device), mask.to(acc.device), weights.to(acc.device)
            # Up to the first loss position: the shared part's own hidden states are never read.
            shared = (shared_prefix(seqs, min(max(1, data[i].n_prompt) for i in batch) - 1)
                      if share and len(batch) > 1 else 0)
            sync = k == len(group) - 1
            ctx = acc.no_sync(wrapper) if not sync and acc.num_processes > 1 else _null()
            with ctx, torch.autocast(torch.device(acc.device).type, dtype=torch.bfloat16, enabled=session.autocast):
                loss = wrapper(ids, mask, weights, shared) / max(1, n_targets)
                acc.backward(loss)
            step_loss += float(loss.detach())
            tokens += int(mask.sum())
            padded += ids.numel()
            response += int((weights > 0).sum())
            sequences += len(batch)
        if config.max_grad_norm:
            acc.clip_grad_norm_(wrapper.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        rows.append(LossRow(step, lr, step_loss, tokens, time.perf_counter() - start))
        steps_done = step
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        bar.update()
    bar.close()
    wall = time.perf_counter() - start
    session.model.eval()
    return FitResult(steps_done, sequences, tokens, padded, response, wall, peak_memory_bytes(session.device),
                     tuple(rows), planned_steps=total_steps, stopped_on_budget=stopped_on_budget)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ---- validate ------------------------------------------------------------------------------------

def subset(examples: Sequence[Example], limit: int | None) -> list[Example]:
    """A deterministic subset (by a hash of the id) so capped evaluations compare like with like."""
    if limit is None or len(examples) <= limit:
        return list(examples)
    ranked = sorted(examples, key=lambda e: hashlib.sha256(e.id.encode()).hexdigest())
    keep = {e.id for e in ranked[:limit]}
    return [e for e in examples if e.id in keep]


def validate(model: Any, tokenizer: Any, split: Split, config: FinetuneConfig, *,
             progress: bool = True) -> dict[str, Any]:
    """Validation loss and decisions, and the test split's decisions (all option orders) and rewrites."""
    from corefbot.models.train.evaluate import evaluate, evaluate_decisions, response_losses

    metrics: dict[str, Any] = {}
    val = subset(split.validation, config.eval_max_examples)
    if val:
        enc, _ = encode_examples(val, tokenizer, seed=config.seed, option_orders=config.option_orders)
        losses = response_losses(model, tokenizer, [(e.ids, e.n_prompt) for e in enc], progress=progress,
                                 desc="validation loss")
        metrics["validation"] = {
            "loss": sum(losses) / len(losses) if losses else math.nan,
            "decision": evaluate_decisions(model, tokenizer, val, progress=progress).summary(),
        }
    test = subset(split.test, config.eval_max_examples)
    if not test:
        raise ValueError(f"the test split is empty ({split.unit} split of {len(split.train)} train examples): "
                         "add labelled conversations, or set split_unit: day for one or two chat groups")
    metrics["test"] = evaluate(model, tokenizer, test, rewrites=config.eval_rewrites,
                               max_new_tokens=config.rewrite_max_new_tokens, progress=progress)
    return metrics


# ---- save ----------------------------------------------------------------------------------------

def write_loss(out: Path, rows: Sequence[LossRow], title: str = "") -> None:
    with open(out / "loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "lr", "loss", "tokens", "elapsed_s"])
        for r in rows:
            w.writerow([r.step, f"{r.lr:.6g}", f"{r.loss:.6f}", r.tokens, f"{r.elapsed_s:.3f}"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r.step for r in rows], [r.loss for r in rows], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("response-token loss")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)


def save(session: Session, out: str | Path, *, fit_result: FitResult, manifest: dict[str, Any],
         metrics: dict[str, Any], extra_config: dict[str, Any] | None = None) -> Path:
    """Write the self-describing run folder."""
    import yaml

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"base": str(session.base.resolve()), **(extra_config or {}), **session.config.to_dict()}
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    session.model.save_pretrained(out / "adapter")
    session.tokenizer.save_pretrained(out / "tokenizer")
    write_loss(out, fit_result.losses, title=f"{session.base.name} · {session.config.preset}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False, default=_json_default))
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


# ---- the whole run -------------------------------------------------------------------------------

def train_and_eval(base: str | Path, train: Sequence[Example], split: Split, config: FinetuneConfig, *,
                   progress: bool = True) -> tuple[Session, FitResult, dict[str, Any], int]:
    """setup → fit → validate, asserting that nothing held out is trained on."""
    assert_no_leak(split, trained_on=train)
    session = setup(base, config)
    data, dropped = encode_examples(train, session.tokenizer, seed=config.seed, sequence_len=config.sequence_len,
                                    copy_unneeded=config.copy_unneeded, option_orders=config.option_orders)
    result = fit(session, data, progress=progress)
    metrics: dict[str, Any] = {}
    if session.accelerator.is_main_process:
        metrics = validate(session.model, session.tokenizer, split, config, progress=progress)
    return session, result, metrics, dropped
