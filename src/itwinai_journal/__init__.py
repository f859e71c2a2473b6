"""itwinai-journal: the compute-node side of itwinai-sync.

Loggers with the `itwinai.loggers` API (in `itwinai_journal.loggers`) write every record to a
local, append-only, per-rank journal; `Journal` reads it back and `verify` checks it. Importing
this package imports no tracker library and no torch.
"""

from itwinai_journal.read.journal import Journal, RankInfo, RunInfo
from itwinai_journal.read.verify import Problem, digest, verify

__version__ = "0.1.0"

__all__ = ["Journal", "RunInfo", "RankInfo", "verify", "digest", "Problem", "__version__"]
