"""Looking at journals without a tracker: which runs and metrics (`selection`), metric points
grouped into series (`series`), summaries and sparklines for `show` (`summaries`), plots
(`plot`), tidy metrics tables (`export`) and a live tail (`tail`).

Everything here reads journals through `itwinai_journal` (its reader, and its follower for the
tail); nothing here knows segment, index or manifest bytes.
"""

from itwinai_journal.errors import ItwinaiSyncError


class ViewError(ItwinaiSyncError):
    """A user-facing problem (no such run, no metrics, unknown output format): one line."""
