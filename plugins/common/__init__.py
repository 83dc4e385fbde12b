"""What the plugins share: every setting (:mod:`.settings`)."""
