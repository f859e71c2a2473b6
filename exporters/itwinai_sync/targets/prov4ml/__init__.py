"""Prov4ML target: each rank of a journal run becomes one yProv4ML provenance run (PROV-JSON
document, metric files, artifacts, optionally the graph as DOT and SVG), made by yprov4ml itself.

Layout (`DIR` is `--dir` or `<savedir>/prov`):

    DIR/<experiment-dir>/<run_id>/rank-<rank:05d>/      yprov4ml's provenance_save_dir
        <experiment>_0/                                  yprov4ml's run folder (index pinned to 0)
            prov_<experiment>_GR<rank>_0.json            the PROV-JSON document
            prov_<experiment>_GR<rank>_0.dot / .svg      the graph (create_graph / create_svg)
            metrics_GR<rank>/<name>_<context>_<source>_GR<rank>.csv    epoch,value,timestep
            artifacts_GR<rank>/<name>/...                models, best models, artifacts
            .itwinai-sync-cursor                         the journal seq the documents cover
            .itwinai-sync-records.arrow                  the records they were built from

`<experiment>` is the Prov4MLLogger's `experiment_name` (else the journal's experiment); the
other declared options (`prov_user_namespace`, `save_after_n_logs`, `create_graph`,
`create_svg`) are honoured too. The rank is given to yprov4ml as its global rank together with
`collect_all_processes=True`, as yprov4ml's own itwinai logger does: with a rank other than 0
and without that flag, `start_run` replaces the logging methods by no-ops. So the files carry
yprov4ml's own `GR<rank>` names, and each rank has its own folder, which is what makes the
atomic replacement below possible per rank.

Exactly once, for a document generator: a provenance document is not appended to, it is
regenerated from every record it covers. `export` holds the batches it is handed; the
documents are built when a batch reaches the end of a rank that has ended (so that the cursor
is committed inside `export`, as the protocol wants), else in `close` (a rank still running,
or a sync stopped early), from the records the committed documents were built from (kept
beside them) and the batches held: the journal is never read again, so a `--watch` pass costs
what it adds to the input, not a re-read of the whole journal (the build itself still replays
every record: yprov4ml's documents are not appendable). A build writes everything into a
temporary sibling directory `.tmp-rank-<r>-<token>`, writes the cursor marker and the records
inside it, fsyncs, then swaps it with the previous `rank-<r>` directory (rename the old one
aside, rename the new one in, delete the old one). The cursor is therefore committed in the
same rename as the documents it describes: a crash leaves the old documents with the old
cursor, or the new ones with the new one; leftovers are cleaned (and a documents folder
renamed aside but not replaced is put back) when the rank is next opened. Running the sync
again with nothing new does not touch the documents; with new records, the rank is rebuilt:
no second run folder, no duplicated points.

The documents are deterministic: built twice from the same journal they are byte-identical.
yprov4ml stamps the current time, a random PID and the exporting machine into a document; here
the times are the journal's (the run activity starts when the rank's first session started and
ends when its last one ended, each metric, artifact and context is stamped with the time of the
record that created it, in UTC), the PID is a UUID derived from the run and rank, the agent is
the user who trained, and the compute node's host, Python version, world size and journal run
id replace the exporting machine's platform fields. Paths inside the document are the final
ones, not the temporary directory's.

Kinds (context: the record's `context`, default "training", as itwinai's Prov4MLLogger;
timestamps: the record's time in milliseconds; a record without a step is written at step 0,
yprov4ml's default):
- `metric`: `log_metric` (source None, as itwinai's Prov4MLLogger logs them); a metric that
  is not a number (a `text` record with meta['logged_as'] = 'metric') with its JSON value,
  which yprov4ml writes as str() (see `_Replay._logged_metric`); other texts are not for this
  target; a step the journal kept in meta['step'] (1.5, 2**70) as it was logged;
- `flops_pb`, `flops_pe`, `execution_time`, `system`, `carbon`: `log_metric` of what itwinai's
  Prov4MLLogger would have logged with the yprov4ml it pins (2.0.9), computed from the
  journal's measurements by `MeasuredView` (names, units, running FLOP totals), with the
  source yprov4ml gives the kind (`fvcore.nn.FlopCountAnalysis`, `codecarbon`, `std.time`;
  system metrics the method that read them, `psutil` or `procfs`, as yprov4ml 3's carry their
  hardware access mode); the method that actually measured a metric (fvcore, FlopCounterMode
  halved, rapl, ...) is added to its metric entity as `yprov:measurement_method`. Sampled
  system metrics (`system_metric`, the background sampler's) are shown as `system` records,
  at step = the sample's ordinal in the rank, in the default context, with the source
  `<method>.sampled` (their own series beside those of logged `system` records). Nothing is
  measured at export time: yprov4ml's own FLOPs/system/carbon helpers would measure the
  exporting machine;
- `param`: `log_param` of the JSON value as an input (`provml:HyperParameter`);
- `model` (each call a new version `<name>_<k>`, like `save_model_version`), `best_model` (one
  `<name>`, like `log_model`), `torch`, `artifact`: files under `artifacts_GR<r>/<name>/`
  logged with `log_artifact` (models as `provml:Model`, with `log_model`'s parameter-count
  attributes); for `best_model`, `torch` and `artifact` only the last record of a name is
  kept, as the file it would have overwritten. A model file is the module's `state_dict`, as
  yprov4ml saves it, read from the journal's `torch.save` of the whole module by torch's
  weights-only unpickler without importing or running any of its code
  (`state_dict_from_module`). A `torch` object is the
  journal's `torch.save` file and, when it loads with `weights_only` (tensors and containers),
  also a param, as itwinai's Prov4MLLogger logs it with `log_param`;
- `prov_documents`: the documents are produced on every export, whether a run logged the marker
  or not.
Names yprov4ml cannot take (':' makes a PROV qualified name, '/' a path, very long names a too
long file name) are mapped deterministically and the mapping is reported.

yprov4ml keeps one global run (`yprov4ml.constants.PROV4ML_DATA`), so ranks are built one at a
time in this process (`itwinai_sync.compat.yprov4ml_session`, which also replaces three of its
module globals while a rank is built: its clock, the 1 s sleep of `start_run`, the
`requirements.txt` lookup of `end_run`), and `parallel_runs` is False. This is faster than a
subprocess per rank, which pays yprov4ml's import (about 3 s: torch, pandas, xarray, ...) for
every rank. The graph is drawn with yprov4ml's `custom_prov_to_dot` from the final document;
the SVG needs Graphviz's `dot` and is skipped with a note without it. yprov4ml is imported
only when a rank is built.

Modules: `exporter` (the exporter and the sink holding a rank's batches), `layout` (the rank
directory: documents, cursor, the records they cover, the atomic swap), `build` (the records
replayed through yprov4ml, the document made to describe the training), `measured` (measured
kinds as yprov4ml shows them), `models` (state_dicts without running the journal's code),
`naming` (names yprov4ml can take).
"""
