"""What the plugins share: every setting (:mod:`.settings`, also read by the CLI), the database handle on the
chatlog's writer (:mod:`.database`), who may moderate (:mod:`.moderators`) and answering a command off the
record (:mod:`.replies`)."""
