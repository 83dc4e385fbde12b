"""Everything with weights, one room per lifecycle: :mod:`.serve` (a question → a decision and a rewrite),
:mod:`.train` (fine-tune and evaluate), :mod:`.ship` (GGUF, registry, nightly retraining).

Never imports nonebot or plugins; torch, transformers, peft and llama_cpp are imported inside the
functions that need them so the bot and the CLI start fast.
"""
