"""A journal is untrusted input (issue 15, points 4 to 8): `verify` finds tampering within its
threat model, a crafted journal cannot make a reader write or read outside its directories,
secrets never reach the journal in any encoding, a damaged manifest or run.json costs only its
own run, and every run the logger can write is listed and synced."""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote, quote_plus

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import child_env, spawn
from tensorboard.backend.event_processing import event_accumulator

from itwinai_journal import Journal, verify
from itwinai_journal.format.blobs import BlobStore
from itwinai_journal.format.names import experiment_dirname
from itwinai_journal.loggers import MLFlowLogger
from itwinai_journal.read.journal import find_run_dirs
from itwinai_sync.cli import main

mlflow = pytest.importorskip("mlflow")


# -- helpers ------------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    """`itwinai-sync ARGS` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "itwinai_sync.cli", *map(str, args)],
                          capture_output=True, text=True, env=child_env(), timeout=300)


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def journal(savedir: Path, run_id: str = "r1", experiment: str = "exp", sessions: int = 3,
            n: int = 100) -> Path:
    """A run of `sessions` sessions of `n` metrics each (one sealed segment per session);
    returns its rank directory."""
    for s in range(sessions):
        lg = MLFlowLogger(savedir=savedir, experiment_name=experiment, run_id=run_id,
                          log_freq="batch")
        lg.create_logger_context()
        for i in range(s * n, (s + 1) * n):
            lg.log(float(i), "loss", step=i)
        lg.destroy_logger_context()
    return savedir / experiment_dirname(experiment) / run_id / "rank-00000"


def errors(savedir: Path) -> list[str]:
    return [str(p) for p in verify(savedir) if p.severity == "error"]


def tb_steps(logdir: Path, experiment: str, run_id: str, tag: str = "loss") -> list[int]:
    """The steps of `tag` as TensorBoard's own reader sees them."""
    path = logdir / experiment_dirname(experiment) / run_id / "rank-00000"
    acc = event_accumulator.EventAccumulator(
        str(path), size_guidance={k: 0 for k in event_accumulator.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def edit_value(parquet: Path) -> None:
    """Change one record's value in a sealed segment; seqs and count stay as they were."""
    t = pq.read_table(parquet)
    values = t["value"].to_pylist()
    values[3] = 1e6
    pq.write_table(t.set_column(t.schema.get_field_index("value"), "value",
                                pa.array(values, pa.float64())), parquet)


def index_lines(rank_dir: Path) -> list[bytes]:
    return (rank_dir / "index.jsonl").read_bytes().split(b"\n")[:-1]


def write_index(rank_dir: Path, lines: list[bytes]) -> None:
    (rank_dir / "index.jsonl").write_bytes(b"".join(ln + b"\n" for ln in lines))


def fix_last_index_hash(rank_dir: Path, parquet: Path) -> bytes:
    """Recompute the last index line for an edited last segment (the chain stays valid: no line
    follows it); returns the new line."""
    lines = index_lines(rank_dir)
    entry = json.loads(lines[-1])
    entry["sha256"] = hashlib.sha256(parquet.read_bytes()).hexdigest()
    lines[-1] = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    write_index(rank_dir, lines)
    return lines[-1]


# == 15.4: verify misses tampering ===============================================================


def _delete_index_and_edit_a_segment(rank: Path) -> None:
    (rank / "index.jsonl").unlink()
    edit_value(rank / "segments" / "000002.parquet")


def _delete_last_index_line_and_edit_last_segment(rank: Path) -> None:
    write_index(rank, index_lines(rank)[:-1])
    edit_value(rank / "segments" / "000003.parquet")


def _delete_last_segment_and_its_index_line(rank: Path) -> None:
    write_index(rank, index_lines(rank)[:-1])
    (rank / "segments" / "000003.parquet").unlink()


def _fake_jsonl_after_the_finished_session(rank: Path) -> None:
    lines = "".join(f'{{"seq":{s},"time":{time.time()},"kind":"metric","name":"loss",'
                    f'"step":{s - 1},"value":0.5}}\n' for s in range(301, 311))
    (rank / "segments" / "000004.jsonl").write_text(lines)


def _edit_last_segment_and_fix_its_hash(rank: Path) -> None:
    edit_value(rank / "segments" / "000003.parquet")
    fix_last_index_hash(rank, rank / "segments" / "000003.parquet")


def _edit_manifest_destination(rank: Path) -> None:
    m = json.loads((rank / "manifest.json").read_text())
    m["destinations"]["mlflow"]["tracking_uri"] = "http://collector.example.org:5000"
    (rank / "manifest.json").write_text(json.dumps(m))


TAMPERING = {
    "deleted index.jsonl + edited segment": (
        _delete_index_and_edit_a_segment, "sealed segment missing from the index"),
    "deleted last index line + edited last segment": (
        _delete_last_index_line_and_edit_last_segment, "index lines were removed"),
    "deleted last segment with its index line": (
        _delete_last_segment_and_its_index_line, "records 201..300 are missing"),
    "fake JSONL segment after a finished session": (
        _fake_jsonl_after_the_finished_session, "records 301..310 follow the end of the last"),
    "edited last segment with its hash fixed in the index": (
        _edit_last_segment_and_fix_its_hash, "the index was rewritten"),
    "edited manifest.json destination": (
        _edit_manifest_destination, "the declared destinations differ from what the index"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_verify_detects_tampering(tmp_path, case):
    savedir = tmp_path / "mllogs"
    rank = journal(savedir)
    assert invoke("verify", savedir).exit_code == 0
    tamper, expected = TAMPERING[case]
    tamper(rank)
    result = invoke("verify", savedir)
    assert result.exit_code == 1, result.output
    assert expected in result.output, result.output
    assert "Traceback" not in result.output


def test_verify_during_a_seal_warns_naming_the_segment(tmp_path, monkeypatch):
    """A rank being written: verify reads its active segment while the writer seals it, and
    copies of the rank taken during a seal (the index and the segments copied at different
    moments, as rsync does) are warnings naming the segment, not integrity errors (they were
    false alarms). The same states with records really missing are still errors."""
    import shutil

    from itwinai_journal.format import segments

    savedir = tmp_path / "mllogs"
    lg = MLFlowLogger(savedir=savedir, experiment_name="exp", run_id="live", log_freq="batch")
    lg.create_logger_context()
    lg._writer.seal_records = 100
    run = savedir / "exp" / "live"
    at_seal: dict[int, tuple[bytes, bytes]] = {}  # index and active segment as a seal starts
    real_seal = segments.seal

    def seal(rank_dir, number, table, anchors=None):
        index = rank_dir / "index.jsonl"
        at_seal[number] = (index.read_bytes() if index.exists() else b"",
                           (rank_dir / "segments" / f"{number:06d}.jsonl").read_bytes())
        return real_seal(rank_dir, number, table, anchors)

    monkeypatch.setattr(segments, "seal", seal)
    for i in range(50):
        lg.log(float(i), "loss", step=i)
    lg._writer.flush()  # segment 1 active
    real_read = segments.read_jsonl

    def read_while_sealing(path, *args, **kwargs):
        if path.name == "000001.jsonl":
            for i in range(50, 120):
                lg.log(float(i), "loss", step=i)
            lg._writer.flush()  # segment 1 sealed, 2 opened
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(segments, "read_jsonl", read_while_sealing)
    live = verify(savedir)
    monkeypatch.setattr(segments, "read_jsonl", real_read)
    assert [(p.severity, Path(p.path).name) for p in live] == [("warning", "000001.parquet")]
    assert "sealed while verify read it" in live[0].message
    for i in range(120, 250):
        lg.log(float(i), "loss", step=i)
        if i % 10 == 0:
            lg._writer.flush()
    lg._writer.flush()  # segment 2 sealed (at 100 records), 3 active
    assert sorted(at_seal) == [1, 2]
    index_before, jsonl_before = at_seal[2]

    def copy(name: str) -> Path:
        target = tmp_path / name / "exp" / "live"
        shutil.copytree(run, target)
        return target / "rank-00000"

    def found(name: str) -> list[tuple[str, str]]:
        return [(p.severity, Path(p.path).name) for p in verify(tmp_path / name)]

    # the index copied before the seal, the segments after it (3 opened meanwhile)
    (copy("index-first") / "index.jsonl").write_bytes(index_before)
    assert found("index-first") == [("warning", "000002.parquet")]
    # the active segment copied before the seal, the index after it
    for name, jsonl in (("jsonl-first", jsonl_before),
                        ("jsonl-cut", b"".join(jsonl_before.splitlines(True)[:40]))):
        segs = copy(name) / "segments"
        (segs / "000002.parquet").unlink()
        (segs / "000003.jsonl").unlink()
        (segs / "000002.jsonl").write_bytes(jsonl)
    assert found("jsonl-first") == [("warning", "000002.jsonl")]
    assert ("error", "000002.jsonl") in found("jsonl-cut")  # records the index lists are gone
    (copy("deleted") / "segments" / "000002.parquet").unlink()
    assert ("error", "000002.parquet") in found("deleted")
    lg.destroy_logger_context()
    assert verify(savedir) == []


def test_a_consistent_forgery_passes_verify_but_not_the_recorded_digest(tmp_path):
    """The stated limit of `verify`: whoever rewrites every copy consistently (segment, index,
    the manifest's record of the index) forges a journal that checks out. A digest recorded
    out of band catches it."""
    savedir = tmp_path / "mllogs"
    rank = journal(savedir)
    first = invoke("verify", savedir)
    assert first.exit_code == 0
    recorded = first.output.split("digest: ")[1].strip()
    assert invoke("verify", savedir, "--expect", recorded).exit_code == 0

    edit_value(rank / "segments" / "000003.parquet")
    line = fix_last_index_hash(rank, rank / "segments" / "000003.parquet")
    m = json.loads((rank / "manifest.json").read_text())
    m["sessions"][-1]["index_end"]["head"] = hashlib.sha256(line).hexdigest()
    (rank / "manifest.json").write_text(json.dumps(m))

    assert invoke("verify", savedir).exit_code == 0  # undetectable without an anchor
    result = invoke("verify", savedir, "--expect", recorded)
    assert result.exit_code == 1 and "the journal changed since" in result.output
    assert Journal(savedir).metrics()["value"].to_pylist()[203] == 1e6  # the forged value


def test_verify_digest_is_the_same_for_a_copy_elsewhere(tmp_path):
    import shutil

    journal(tmp_path / "a" / "mllogs", sessions=2)
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)
    digests = [invoke("verify", tmp_path / d / "mllogs").output.split("digest: ")[1]
               for d in ("a", "b")]
    assert digests[0] == digests[1]


# == 15.5: a crafted journal escapes =============================================================


def _listing(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_a_crafted_run_id_writes_nothing_outside_its_directories(tmp_path):
    """run.json says run_id '../../../../../escaped': the TensorBoard sync, its ledger and
    `export -o` would each have built a path out of it."""
    base = tmp_path / "a" / "b" / "c"
    savedir, out = base / "mllogs", base / "out"
    journal(savedir, run_id="evil", sessions=1)
    journal(savedir, run_id="good", sessions=1)
    run_json = savedir / "exp" / "evil" / "run.json"
    info = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({**info, "run_id": "../../../../../escaped"}))
    before = _listing(tmp_path) - _listing(savedir)

    synced = cli(savedir, "--to", "tensorboard")
    exported = cli("export", savedir, "-o", out)
    listed = cli("ls", savedir)

    outside = _listing(tmp_path) - _listing(savedir) - _listing(out) - {out} - before
    assert outside == set()
    assert synced.returncode == 1 and "FAILED  exp/evil" in synced.stdout
    assert "run id '../../../../../escaped' cannot be used as a directory name" in synced.stdout
    assert tb_steps(savedir / "tensorboard", "exp", "good") == list(range(100))
    assert exported.returncode == 0 and (out / "exp" / "good.parquet").exists()
    assert "Traceback" not in synced.stderr + exported.stderr + listed.stderr
    assert listed.returncode == 0 and "evil  DAMAGED" in listed.stdout


def _crafted_rank(savedir: Path, run_id: str, records: list[dict]) -> BlobStore:
    """A run written by hand, as an attacker would: run.json, a manifest, one JSONL segment."""
    rank = savedir / "exp" / run_id / "rank-00000"
    (rank / "segments").mkdir(parents=True)
    (rank.parent / "run.json").write_text(json.dumps(
        {"format_version": 1, "experiment": "exp", "run_id": run_id, "created": time.time()}))
    (rank / "manifest.json").write_text(json.dumps({
        "rank": 0, "world_size": 1, "destinations": {"mlflow": {}}, "dropped_records": 0,
        "sessions": [{"status": "finished", "first_seq": 1, "last_seq": len(records)}]}))
    lines = [json.dumps({"seq": i, "time": time.time(), "name": f"r{i}", **r}) + "\n"
             for i, r in enumerate(records, 1)]
    (rank / "segments" / "000001.jsonl").write_text("".join(lines))
    return BlobStore(rank / "blobs")


def _artifact_record(blob: str, meta: dict) -> dict:
    return {"kind": "artifact", "blob": blob, "meta": json.dumps(meta)}


def test_crafted_blob_references_reach_no_file_and_no_tracker(tmp_path):
    """Records whose blob is a path (`../../etc/hostname`), a symlink to a file elsewhere, a
    file name or a directory listing that leaves the exporter's temporary directory: each run
    is reported and skipped; nothing reaches MLflow and nothing is written outside."""
    import tempfile

    savedir = tmp_path / "mllogs"
    journal(savedir, run_id="good", sessions=1)
    up = "../" * 12
    _crafted_rank(savedir, "path", [
        {"kind": "metric", "value": 1.0},
        _artifact_record(f"{up}etc/hostname", {"type": "file", "file_name": "hostname"})])

    store = _crafted_rank(savedir, "link", [_artifact_record("ab" * 32, {"type": "file"})])
    (store.root / "ab").mkdir(parents=True)
    (store.root / "ab" / ("ab" * 32)).symlink_to("/etc/hostname")

    escaped = [Path(tempfile.gettempdir()) / f"escaped-{uuid.uuid4().hex}" for _ in range(2)]
    payload = b"payload"
    sha = hashlib.sha256(payload).hexdigest()
    store = _crafted_rank(savedir, "names", [
        _artifact_record(sha, {"type": "file", "file_name": f"../{escaped[0].name}"})])
    store.put_bytes(payload)
    listing = json.dumps({"files": [{"path": f"../{escaped[1].name}", "sha256": sha,
                                     "size": len(payload)}]}).encode()
    store = _crafted_rank(savedir, "tree", [_artifact_record(
        hashlib.sha256(listing).hexdigest(), {"type": "directory", "dir_name": "d", "files": 1})])
    store.put_bytes(payload)
    store.put_bytes(listing)

    try:
        result = invoke(savedir, "--to", "mlflow")
        leaked = [p for p in escaped if p.exists()]
    finally:
        for p in escaped:
            if p.exists():
                p.unlink()
    assert leaked == []
    assert result.exit_code == 1, result.output
    for run_id in ("path", "link", "names", "tree"):
        assert f"FAILED  exp/{run_id} -> mlflow" in result.output, result.output
    assert "Traceback" not in result.output
    client = mlflow.MlflowClient(f"sqlite:///{savedir.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name("exp")
    for run in client.search_runs([exp.experiment_id]):
        key = run.data.tags.get("itwinai.run")
        if key == "exp/good":
            assert run.data.tags["itwinai.role"] == "parent" or len(
                client.get_metric_history(run.info.run_id, "loss")) == 100
        else:
            assert client.list_artifacts(run.info.run_id) == [], key
            assert run.data.metrics == {}, key
    messages = "\n".join(str(p) for p in verify(savedir) if p.severity == "error")
    assert "blob reference '../../" in messages and "a blob is a symbolic link" in messages
    assert "file_name '../escaped-" in messages and "listed path '../escaped-" in messages


def test_a_rank_directory_with_a_bad_name_is_ignored_not_a_crash(tmp_path):
    savedir = tmp_path / "mllogs"
    journal(savedir, sessions=1)
    (savedir / "exp" / "r1" / "rank-../").mkdir()  # 'rank-..' with a slash: one directory
    (savedir / "exp" / "r1" / "rank-x").mkdir()
    listed = cli("ls", savedir)
    assert listed.returncode == 0 and "r1  finished  1 rank(s)  100 records" in listed.stdout
    assert "not a rank directory" in cli("verify", savedir).stdout


# == 15.6: secrets on disk =======================================================================

SECRET = 'p@ss/w:rd é"x!+%'
PARAM_SECRETS = {"api_key": "sk-live-00112233", "wandb_token": "wb-0123456789abcdef",
                 "db_password": "correct horse battery"}
NOT_SECRETS = {"num_keys": 4, "key_dim": 64, "tokenizer": "bpe", "max_tokens": 512,
               "pad_token": "<pad>", "sort_key": "date"}


def _encodings(secret: str) -> set[str]:
    raw = secret.encode()
    forms = {secret, quote(secret), quote(secret, safe=""), quote_plus(secret),
             quote(secret, safe="").lower(), json.dumps(secret)[1:-1],
             json.dumps(secret, ensure_ascii=False)[1:-1], raw.hex(),
             base64.b64encode(raw).decode().rstrip("=")}
    for user in ("bob:", "x", "xy"):
        enc = base64.b64encode((user + secret).encode()).decode()
        forms.add(enc[len(user) * 4 // 3 + 2:-4])  # the part that depends only on the secret
    return forms


SECRET_CHILD = """
import sys
from urllib.parse import quote
from itwinai_journal.loggers import MLFlowLogger
secret = {secret!r}
lg = MLFlowLogger(savedir={savedir!r}, experiment_name="exp", run_id="s",
                  tracking_uri="http://bob:" + quote(secret, safe="") + "@127.0.0.1:9/")
lg.create_logger_context()
for name, value in {params!r}.items():
    lg.log(value, name, kind="param")
lg.log("https://bob:hunter22@example.org/db", "backend", kind="param")
lg.log({{"mlflow": {{"password": "in-a-dict-9", "port": 1}}, "lr": 0.1}}, "config", kind="param")
lg.log(1.0, "loss", step=0)
lg.destroy_logger_context()
"""


def test_no_secret_reaches_the_journal_or_the_tracker_in_any_encoding(tmp_path):
    """An environment secret percent-encoded in a URI (as a URI password must be), base64 in
    argv, JSON-escaped; URI userinfo that is in no variable; params named like secrets. The
    logging process is real, its argv too; the params then go through a real MLflow store."""
    savedir = tmp_path / "mllogs"
    params = {**PARAM_SECRETS, **NOT_SECRETS}
    basic = base64.b64encode(f"bob:{SECRET}".encode()).decode()
    code = SECRET_CHILD.format(secret=SECRET, savedir=str(savedir), params=params)
    proc = subprocess.run(
        [sys.executable, "-c", code, "--uri", f"http://bob:{quote(SECRET, safe='')}@host/",
         f"--auth=Basic {basic}", "--api-key", "sk-live-00112233", "--max-tokens", "512"],
        capture_output=True, text=True, timeout=120,
        env=child_env(MLFLOW_TRACKING_PASSWORD=SECRET))
    assert proc.returncode == 0, proc.stderr

    on_disk = b"".join(p.read_bytes() for p in savedir.rglob("*") if p.is_file())
    for secret in (SECRET, *PARAM_SECRETS.values(), "hunter22", "in-a-dict-9"):
        for form in _encodings(secret):
            assert form.encode() not in on_disk, (secret, form)
    assert "param 'api_key' holds a secret" in proc.stderr
    (rank,) = Journal(savedir).runs()[0].ranks
    argv = rank.manifest["sessions"][-1]["argv"]
    assert argv[1:] == ["--uri", "http://host/", "--auth=Basic <redacted>", "--api-key",
                        "<redacted>", "--max-tokens", "512"]
    assert rank.manifest["destinations"]["mlflow"]["tracking_uri"] == "http://127.0.0.1:9/"

    result = invoke(savedir, "--to", "mlflow", "--tracking-uri",
                    f"sqlite:///{savedir.resolve()}/mlflow.db")
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient(f"sqlite:///{savedir.resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    (got,) = [r.data.params for r in runs if r.data.params]
    assert {k: got[k] for k in PARAM_SECRETS} == dict.fromkeys(PARAM_SECRETS, "<redacted>")
    assert {k: got[k] for k in NOT_SECRETS} == {k: str(v) for k, v in NOT_SECRETS.items()}
    assert got["backend"] == "https://example.org/db"
    # MLflow stores a param as str(value), as itwinai's MLFlowLogger sends it
    assert ast.literal_eval(got["config"]) == {"mlflow": {"password": "<redacted>", "port": 1},
                                               "lr": 0.1}


@pytest.mark.parametrize("name", ["api_key", "wandb_token", "db_password", "WANDB_API_KEY",
                                  "apiKey", "client_secret", "token", "hf_token",
                                  "AWS_SECRET_ACCESS_KEY", "--api-key", "credentials"])
def test_secret_looking_names(name):
    from itwinai_journal.format.redaction import is_secret_name

    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["num_keys", "key_dim", "tokenizer", "max_tokens", "pad_token",
                                  "eos_token", "sort_key", "rng_key", "keyword", "monkey",
                                  "TOKENIZERS_PARALLELISM", "PWD", "--max-tokens", "token_type"])
def test_names_that_are_not_secrets(name):
    from itwinai_journal.format.redaction import is_secret_name

    assert not is_secret_name(name)


# == 15.7: one damaged manifest.json or run.json =================================================


def test_a_damaged_manifest_or_run_json_costs_only_its_own_run(tmp_path):
    savedir = tmp_path / "mllogs"
    for run_id in ("a", "b", "c", "d", "e"):
        journal(savedir, run_id=run_id, sessions=1, n=50)
    (savedir / "exp" / "b" / "rank-00000" / "manifest.json").write_text('{"rank": 0, "sess')
    (savedir / "exp" / "c" / "run.json").write_bytes(b"\x00\x00\x00")  # a page never written
    (savedir / "exp" / "d" / "run.json").unlink()
    manifest_e = savedir / "exp" / "e" / "rank-00000" / "manifest.json"
    manifest_e.unlink()
    manifest_e.symlink_to("/dev/zero")  # would never end

    listed = cli("ls", savedir, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["run_id"]: r for r in json.loads(listed.stdout)}
    assert rows["a"]["status"] == "finished" and rows["a"]["records"] == 50
    assert rows["b"]["status"] == rows["c"]["status"] == rows["d"]["status"] == "damaged"
    assert "manifest.json: damaged" in rows["b"]["error"]
    assert "run.json: damaged" in rows["c"]["error"]
    assert "run.json is missing" in rows["d"]["error"]
    assert "manifest.json: damaged (not a regular file)" in rows["e"]["error"]

    synced = cli(savedir, "--to", "tensorboard")
    assert synced.returncode == 1
    assert "FAILED  exp/b -> tensorboard: damaged, not synced" in synced.stdout
    assert "FAILED  exp/c -> tensorboard: damaged, not synced" in synced.stdout
    assert tb_steps(savedir / "tensorboard", "exp", "a") == list(range(50))
    shown = cli("show", savedir, "b")
    assert shown.returncode == 1 and "run exp/b is damaged" in shown.stderr
    checked = cli("verify", savedir)
    assert checked.returncode == 1
    for out in (listed, synced, shown, checked):
        assert "Traceback" not in out.stdout + out.stderr

    with pytest.warns(RuntimeWarning, match="skipping a damaged run"):
        assert [r.run_id for r in Journal(savedir).runs()] == ["a"]
    assert [(r.run_id, bool(r.error)) for r in Journal(savedir).scan()] == [
        ("a", False), ("b", True), ("c", True), ("d", True), ("e", True)]


def test_an_index_that_is_not_a_regular_file_costs_only_its_own_run(tmp_path):
    """index.jsonl made a FIFO (a read would wait for a writer for ever) or a directory: `ls`
    lists that run as damaged, naming the file, and goes on; sync and verify report it."""
    savedir = tmp_path / "mllogs"
    for run_id in ("a", "fifo", "dir"):
        journal(savedir, run_id=run_id, sessions=1, n=50)
    fifo = savedir / "exp" / "fifo" / "rank-00000" / "index.jsonl"
    fifo.unlink()
    os.mkfifo(fifo)
    directory = savedir / "exp" / "dir" / "rank-00000" / "index.jsonl"
    directory.unlink()
    directory.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:  # a hang fails within a minute
        return subprocess.run([sys.executable, "-m", "itwinai_sync.cli", *map(str, args)],
                              capture_output=True, text=True, env=child_env(), timeout=60)

    listed = run("ls", savedir, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["run_id"]: r for r in json.loads(listed.stdout)}
    assert (rows["a"]["status"], rows["a"]["records"]) == ("finished", 50)
    for run_id, path in (("fifo", fifo), ("dir", directory)):
        assert rows[run_id]["status"] == "damaged"
        assert rows[run_id]["error"] == f"{path}: unreadable (not a regular file)"
    synced = run(savedir, "--to", "tensorboard")
    assert synced.returncode == 1
    assert "FAILED  exp/fifo -> tensorboard: damaged, not synced" in synced.stdout
    assert "FAILED  exp/dir -> tensorboard: damaged, not synced" in synced.stdout
    assert tb_steps(savedir / "tensorboard", "exp", "a") == list(range(50))
    checked = run("verify", savedir)
    assert checked.returncode == 1 and str(fifo) in checked.stdout and str(directory) in \
        checked.stdout
    for out in (listed, synced, checked):
        assert "Traceback" not in out.stdout + out.stderr


def test_a_new_session_on_an_index_or_manifest_that_is_not_a_file_never_waits(tmp_path):
    """index.jsonl or manifest.json made a FIFO (opening it to read would wait for a writer
    for ever): a new session of the rank sets each aside with a warning, rebuilds the index
    from the sealed segments and the manifest from the index, and logs on; nothing already
    logged is lost. In a child process: a hang fails within a minute."""
    savedir = tmp_path / "mllogs"
    rank = journal(savedir, run_id="b", sessions=2, n=50)
    for name in ("index.jsonl", "manifest.json"):
        (rank / name).unlink()
        os.mkfifo(rank / name)
    proc = spawn(RESUME.format(savedir=str(savedir)))
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert proc.returncode == 0, stderr
    assert "index.jsonl is not a regular file; it is kept as index.jsonl.damaged-" in stderr
    assert "manifest.json was damaged" in stderr
    steps = [r["step"] for r in Journal(savedir).records(run_id="b").to_pylist()]
    assert steps == list(range(100)) + list(range(50, 80))
    assert not list(rank.glob("index.jsonl.damaged-*"))[0].is_file()


RESUME = """
from itwinai_journal.loggers import MLFlowLogger
lg = MLFlowLogger(savedir={savedir!r}, experiment_name="exp", run_id="b", log_freq="batch")
lg.create_logger_context()
for i in range(50, 80):
    lg.log(float(i), "loss", step=i)
lg.destroy_logger_context()
"""


def test_a_new_session_starts_from_a_damaged_manifest_and_keeps_every_record(tmp_path):
    savedir = tmp_path / "mllogs"
    rank = journal(savedir, run_id="b", sessions=2, n=25)
    damaged = b'{"rank": 0, "sess'
    (rank / "manifest.json").write_bytes(damaged)

    proc = spawn(RESUME.format(savedir=str(savedir)))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "was damaged" in err and "records 1..50 kept" in err

    (aside,) = rank.glob("manifest.json.damaged-*")
    assert aside.read_bytes() == damaged
    manifest = json.loads((rank / "manifest.json").read_text())
    assert [(s["status"], s["first_seq"], s["last_seq"]) for s in manifest["sessions"]] == [
        ("unknown", 1, 50), ("finished", 51, 80)]
    assert Journal(savedir).metrics()["seq"].to_pylist() == list(range(1, 81))
    assert [p.severity for p in verify(savedir)] == ["warning"]  # the rebuild, nothing else
    assert invoke(savedir, "--to", "tensorboard").exit_code == 0
    assert tb_steps(savedir / "tensorboard", "exp", "b") == list(range(80))


def test_manifests_are_fsynced_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    """A narrow check of the write order (a power cut itself cannot be staged here): every
    manifest.json replaced by the writer was fsynced first."""
    from itwinai_journal.format import fsio

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(fsio.os, "fsync", fsync)
    monkeypatch.setattr(fsio.os, "replace", replace)
    journal(tmp_path, sessions=1, n=5)
    replaced = [src for what, src in events if what == "replace" and ".manifest.json." in src]
    assert len(replaced) >= 2  # session start and end
    for src in replaced:
        assert events.index(("fsync", src)) < events.index(("replace", src))


# == 15.8: invisible runs ========================================================================


def test_runs_named_like_journal_directories_and_symlinked_experiments_are_listed_and_synced(
        tmp_path):
    savedir = tmp_path / "mllogs"
    elsewhere = tmp_path / "scratch" / "linked"
    elsewhere.mkdir(parents=True)
    savedir.mkdir()
    (savedir / "linked").symlink_to(elsewhere, target_is_directory=True)
    names = [("segments", "r1"), ("blobs", "r2"), ("__pycache__", "r3"), ("exp", "segments"),
             ("exp", "blobs"), ("exp", "__pycache__"), ("linked", "r4")]
    for experiment, run_id in names:
        journal(savedir, run_id=run_id, experiment=experiment, sessions=1, n=10)
    assert (elsewhere / "r4" / "run.json").exists()  # the logger wrote through the link
    (savedir / "exp" / "loop").symlink_to(savedir, target_is_directory=True)  # a link loop

    listed = cli("ls", savedir, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = sorted((r["experiment"], r["run_id"], r["records"])
                  for r in json.loads(listed.stdout))
    assert rows == sorted((e, r, 10) for e, r in names)
    synced = cli(savedir, "--to", "tensorboard")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    for experiment, run_id in names:
        assert tb_steps(savedir / "tensorboard", experiment, run_id) == list(range(10))
    assert cli("verify", savedir).returncode == 0


def test_links_are_followed_only_where_the_layout_has_them(tmp_path):
    """A link is followed as an experiment directory (at the savedir's top, or under a nested
    journal savedir such as prov_logs/), whose entries are runs, and nowhere else: a link to an
    ancestor of the savedir (`evil -> /`) or one deeper in the tree never leads the walk to
    other journals, and runs deeper than the layout's are not looked for. A link pointing
    outside is not followed beyond it: not to runs two levels below it (`outside -> far`,
    a savedir), and not through a link inside a followed one (`escape`, `runlink`)."""
    savedir = tmp_path / "mllogs"
    others = tmp_path / "others"  # someone else's journal, beside the savedir
    journal(others, run_id="theirs", experiment="exp", sessions=1, n=3)
    elsewhere = tmp_path / "scratch"
    journal(elsewhere, run_id="prov-run", experiment="pexp", sessions=1, n=4)
    journal(savedir, run_id="mine", experiment="exp", sessions=1, n=5)
    (savedir / "prov_logs").mkdir()
    (savedir / "prov_logs" / "pexp").symlink_to(elsewhere / "pexp", target_is_directory=True)
    (savedir / "evil").symlink_to(tmp_path, target_is_directory=True)  # an ancestor
    (savedir / "exp" / "deep").symlink_to(others, target_is_directory=True)  # not a run
    (savedir / "exp2").mkdir()
    (savedir / "exp2" / "link").symlink_to(others / "exp", target_is_directory=True)
    journal(savedir / "a" / "b" / "c", run_id="too-deep", sessions=1, n=1)  # depth 5
    far = tmp_path / "far"  # a journal outside, reached only through links beyond the layout
    journal(far, run_id="faraway", experiment="fexp", sessions=1, n=2)
    (savedir / "outside").symlink_to(far, target_is_directory=True)  # its runs are 2 deeper
    (elsewhere / "pexp" / "escape").symlink_to(far / "fexp", target_is_directory=True)
    (elsewhere / "pexp" / "runlink").symlink_to(far / "fexp" / "faraway",
                                                target_is_directory=True)

    assert [p.relative_to(savedir) for p in find_run_dirs(savedir)] == [
        Path("exp/mine"), Path("exp2/link/theirs"), Path("prov_logs/pexp/prov-run")]
    listed = cli("ls", savedir, "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted((r["experiment"], r["run_id"], r["records"])
                  for r in json.loads(listed.stdout)) == [
        ("exp", "mine", 5), ("exp", "theirs", 3), ("pexp", "prov-run", 4)]
    assert cli("verify", savedir).returncode == 0


def test_session_facts_of_the_wrong_type_are_unknown_not_a_failure(tmp_path):
    """The reader types the manifest's session facts once (RankInfo.sessions): a start, host,
    argv or cwd of the wrong type reads as unknown, and the exporters, which only see those
    facts, export the records as usual."""
    savedir = tmp_path / "mllogs"
    rank_dir = journal(savedir, sessions=2, n=5)
    manifest = json.loads((rank_dir / "manifest.json").read_text())
    first = manifest["sessions"][0]
    real_start = manifest["sessions"][1]["start"]
    first.update(start="yesterday", host=42, argv="python train.py", cwd=["/"], pid="7")
    (rank_dir / "manifest.json").write_text(json.dumps(manifest))

    rank = Journal(savedir).run("r1").rank(0)
    assert [(s.start, s.host, s.argv, s.cwd, s.pid) for s in rank.sessions] == [
        (None, "42", (), None, None), (real_start, manifest["host"], tuple(
            manifest["sessions"][1]["argv"]), manifest["sessions"][1]["cwd"],
            manifest["sessions"][1]["pid"])]
    assert rank.started is None and rank.ended == manifest["sessions"][1]["end"]
    assert [s.last_seq for s in rank.sessions] == [5, 10] and rank.status == "finished"
    assert invoke(savedir, "--to", "tensorboard").exit_code == 0
    assert tb_steps(savedir / "tensorboard", "exp", "r1") == list(range(10))


def test_one_lookup_of_a_run_by_id_for_every_command(tmp_path):
    """`runs_named` is the one lookup by id: a bare id naming runs of two experiments is
    ambiguous for a command that shows one run (KeyError naming the keys to use), copies of
    one run (an rsync copy beside the original) are not, and `Journal.run` takes the copy
    holding the most records, as the sync does."""
    import shutil

    from itwinai_journal.read.journal import runs_named

    savedir = tmp_path / "mllogs"
    journal(savedir, run_id="r1", experiment="a", sessions=1, n=5)
    journal(savedir, run_id="r1", experiment="b", sessions=1, n=5)
    runs = Journal(savedir).runs()
    assert [r.key for r in runs_named(runs, ["r1"])] == ["a/r1", "b/r1"]
    with pytest.raises(KeyError, match="several experiments.*a/r1, b/r1"):
        runs_named(runs, ["r1"], unique=True)
    with pytest.raises(KeyError, match="several experiments"):
        Journal(savedir).run("r1")
    assert Journal(savedir).run("b/r1").key == "b/r1"
    assert runs_named(runs, ["nothing"]) == [] and runs_named(runs, None) == runs

    copy = savedir / "copy"
    shutil.copytree(savedir / "a", copy / "a")
    journal(copy, run_id="r1", experiment="a", sessions=1, n=5)  # the copy holds more
    found = runs_named(Journal(savedir).runs(), ["a/r1"], unique=True)
    assert sorted(r.records for r in found) == [5, 10]
    assert Journal(savedir).run("a/r1").path == copy / "a" / "r1"
