"""Reading journals back without a tracker: runs and records, following a live journal,
verification, and whether a rank's writer is still alive."""
