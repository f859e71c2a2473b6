"""Weights & Biases target: one W&B run per journal rank, grouped by the journal run.

Where runs go: by default (and with `--mode offline`) ordinary W&B offline run directories
under `<savedir>/wandb/` (upload them later with `wandb sync <savedir>/wandb/offline-run-*`),
whatever API key or WANDB_MODE the environment holds: a sync never goes online unless asked.
`--mode online` sends them to the server. Project: `--project`, else the WandBLogger's
`project_name`, else the experiment.

Identity: W&B run id = sha1(journal identity, rank)[:16], name `<run name or run id>-rank<r>`,
group = journal run id, so every sync of a rank continues the same W&B run (`resume="allow"`),
and another journal with the same experiment and run id never does. Syncs writing offline runs
exclude each other per journal with a lock in `<savedir>/wandb/.itwinai-sync-locks/`.

Exactly once: every history row carries `_itwinai_seq`, the highest journal seq it covers, in
the same record as its data; config, summary and artifact writes (idempotent: same keys, same
content digests) come before the row that covers them, and trailing ones are covered by the
summary key `_itwinai_seq_tail` written after them. Every batch ends with its cursor written
(its last row, else that summary key), also a batch with nothing for W&B, so `cursor()` is
what the run holds, never only what the sink took in. The cursor is read back from the run's
`.wandb` transaction logs under `<savedir>/wandb` (every file of that run id and project; only
records complete on disk count, so the unflushed tail a killed export loses is exported again),
and in online mode also from the resumed run's summary. Two wandb-core behaviours matter
(measured with wandb 0.31): `finish()` returns before the log is flushed, so close() waits for
the exit record; and the wandb-core of a killed export outlives it by ~2 s and flushes then, so
a log without exit record is trusted only once unchanged for `logfile.QUIET_SECONDS`.

W&B keeps one run at a time per process here (`parallel_runs = False`), and artifact staging
goes to `<savedir>/wandb/.data` unless WANDB_DATA_DIR is set. System metrics, console capture,
git and requirements of the sync machine are not recorded: they would be mistaken for the
training job's. The training job's own system metrics, sampled into the journal
(`system_metric` records), become the StatsRecords W&B's monitor writes, with its keys (see
system_metrics.py) and the sample's time, so they appear in the run's System panel. What W&B
shows about the machine instead comes from the rank's manifest: the run
starts when the rank's first journal session started, on the compute node's host, and the
run's environment record (W&B's `wandb-metadata.json`: OS, Python, program, arguments, host,
user, executable, git commit, SLURM variables) is the training process's. wandb-core computes
`_runtime` and the run's runtime from its own clock; the SDK offers no way to set them.

Rows and steps, as itwinai's WandBLogger makes them: it ignores `step` and calls
`wandb.log({identifier: item}, commit=True)`, one history row per call, so nothing is ever
refused. Here too W&B's own `_step` counts rows in journal order (continuing from what the run
holds), so every record is kept whatever steps the training used (batch metrics at the global
step and epoch metrics at `step=epoch` included). The journal's step travels with each row as
the metric `itwinai/step`, declared with `define_metric(key, step_metric="itwinai/step")` for
every metric logged with a step (the convention of the Lightning and Hugging Face W&B
loggers), so W&B charts use the training step as x axis. Consecutive records join one row
while they add new keys at the same journal step (a record without step joins any row), which
keeps the rows of a training loop as few as its steps; a row is written at the end of every
exported batch.

Kinds, as `wandb.log({identifier: item})` shows them: metric -> history value (a complex one
by its real part); text -> the string, or, for an object the journal keeps as its JSON
(meta['logged_as']: a metric that is not a number...), the JSON value; dict -> nested keys
(`identifier.key`); torch -> the object as wandb converts it (a
tensor becomes a list, or a histogram above 32 values; a state_dict nested keys), when it loads
with `torch.load(weights_only=True)`, and in any case a W&B artifact of the `torch.save` file.
Where itwinai's calls fail or lose the picture, the export shows it: image (PIL, numpy, torch)
-> wandb.Image (wandb.log makes a numpy array a histogram of its pixels and refuses PIL
images); matplotlib figure -> wandb.Image of its PNG (wandb.log needs plotly to convert it, and
fails without); plotly figure -> wandb.Plotly; histogram (from `watch`) -> wandb.Histogram; param
(`save_hyperparameters` and `kind="param"`) -> config; watch -> a wandb.Graph in the summary
(`graph_<name>`, when `log_graph`); dataset -> summary `datasets/<name>`; artifact, model,
best_model -> W&B artifacts referring to the journal's blob files in place (policy "immutable":
blobs are content-addressed and never change, so nothing is copied).

Modules: `exporter` (the exporter and the sink writing one rank as one W&B run), `rows` (how
journal records become W&B history rows, config, summary and artifacts), `logfile` (the cursor
and what else the run holds, read back from W&B's `.wandb` transaction logs), `machine` (the
training machine W&B is told about, from the journal's session facts).
"""
