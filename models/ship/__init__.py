"""Shipping a model: GGUF conversion and quantisation (:mod:`.gguf`), a run folder to a served GGUF with the
agreement check (:mod:`.export`), the model registry (:mod:`.registry`) and the nightly job that chains
train → evaluate → promote → export → register (:mod:`.nightly`)."""
