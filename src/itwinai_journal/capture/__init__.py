"""Turning a logged object into journal fields, at `log()` time: one module per family of kinds.

Every capture function is `capture(item, ctx, name, options) -> Captured` (see `context`), and
`kinds.CAPTURE` maps every kind to its function. Libraries (torch, numpy, PIL, matplotlib,
plotly, pandas, psutil, pynvml, codecarbon, fvcore) are imported only when an object of theirs
arrives or a measurement needs them, and no tracker library is ever imported: the exporters
decide later how each kind is shown in each tracker.

- values (metric, param, text, dict), objects (artifact, torch, model, dataset), media (image,
  figure), watch (wandb.watch's histograms through torch hooks);
- the kinds itwinai's Prov4MLLogger measures when `log()` is called, measured here on the
  compute node and stored as numbers (no yprov4ml, no tracker, no network; the exporter turns
  them into provenance, with the meaning, units and names yprov4ml 2.0.9 gives them): flops,
  system (with gpu), energy (`carbon`), timing (`execution_time`, `prov_documents`); their
  per-session state in session, first readings in start;
- sampler: the background thread sampling system metrics into every open journal.

Helpers: context (what a capture gets and returns), origin (an object's library), numbers and
text (values as the journal's columns hold them), libraries (optional imports).
"""
