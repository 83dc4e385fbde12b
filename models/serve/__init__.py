"""Serving a question: what a backend is (:mod:`.types`), the cue lexicon (:mod:`.cues`), the gate that lets
self-contained questions skip the model (:mod:`.gate`), the backends (:mod:`.rules`, :mod:`.llama`,
:mod:`.http`), rewrite validation (:mod:`.validate`) and their composition (:mod:`.resolver`)."""
