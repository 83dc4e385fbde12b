"""The NoneBot plugins: :mod:`.chatlog` (capture), :mod:`.resolver` (decide, rewrite, forward), :mod:`.labels`
(confirmation prompts, moderator review, privacy) and :mod:`.nightly` (retraining, /model); :mod:`.common`
holds what they share (every setting, the database handle, the moderator check, off-the-record replies)."""
