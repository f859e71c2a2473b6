"""Writing one rank's journal: the in-memory queue and its flusher, records relayed from forked
children, and the live-sync sidecar started with the session."""
