"""Everything with weights: resolver backends, fine-tuning, selection, GGUF export, scaling-law check.

Never imports nonebot or plugins; torch, transformers, peft and llama_cpp are imported inside the
functions that need them so the bot and the CLI start fast.
"""
