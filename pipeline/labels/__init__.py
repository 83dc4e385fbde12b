"""Labels, one module per concern: rows and audit (:mod:`.rows`), the moderators' review queue
(:mod:`.review`), undo (:mod:`.undo`), statistics (:mod:`.stats`), when a member may be asked (:mod:`.limits`),
the confirmation prompts themselves (:mod:`.prompts`), and what leaves the chat log (:mod:`.forget`)."""
