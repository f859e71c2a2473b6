"""The machine W&B is told a run ran on: the training process's, from the journal's session
facts and manifest, never the exporting machine's."""

from __future__ import annotations

import os
from typing import Any

from itwinai_journal import RankInfo


def text_or_none(value: Any) -> str | None:
    return str(value) if value else None


def environment_record(rank: RankInfo, start: float | None) -> Any:
    """W&B's environment record (its `wandb-metadata.json`) of the training process, from the
    rank's first session and manifest: what W&B's own client would have recorded on the
    compute node, as far as the journal knows it (no hardware inventory)."""
    from wandb.proto import wandb_internal_pb2 as pb

    env = pb.EnvironmentRecord()
    manifest = rank.manifest
    first = rank.sessions[0] if rank.sessions else None
    versions = manifest.get("versions") or {}
    if manifest.get("os"):
        env.os = str(manifest["os"])
    if versions.get("python"):
        impl = manifest.get("python_implementation")
        env.python = f"{impl} {versions['python']}" if impl else str(versions["python"])
    argv = list(first.argv) if first else []
    cwd = first.cwd if first else None
    if argv:
        program = argv[0]
        if cwd and not os.path.isabs(program):
            program = os.path.normpath(os.path.join(cwd, program))
        env.program = program
        env.args.extend(argv[1:])
        relative = os.path.relpath(program, cwd) if cwd else os.path.basename(program)
        env.code_path = env.code_path_local = (
            os.path.basename(program) if relative.startswith("..") else relative)
    if cwd:
        env.root = str(cwd)
    for field_name, value in (("host", rank.host),
                              ("username", manifest.get("user")),
                              ("executable", manifest.get("executable"))):
        if value:
            setattr(env, field_name, str(value))
    if manifest.get("git_commit"):
        env.git.commit = str(manifest["git_commit"])
    for key, value in (manifest.get("job") or {}).items():
        if key.startswith("SLURM_"):
            env.slurm[key[len("SLURM_"):].lower()] = str(value)
    if start is not None:
        env.started_at.FromMicroseconds(int(start * 1e6))
    return env
