"""NoneBot plugins: chatlog (capture), resolver (decide, rewrite, forward), labels, nightly."""
