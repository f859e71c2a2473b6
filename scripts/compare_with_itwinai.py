"""Side by side: the same small training logged by itwinai 0.4.2's real loggers and by ours
followed by `itwinai-sync`, and what W&B (offline), TensorBoard and Prov4ML then hold.

Run it with the reference virtualenv's Python; it runs our side in ours:

    /work/ref/itwinai-venv/bin/python scripts/compare_with_itwinai.py [--write-reference]

`--write-reference` records the reference's tracker contents (machine-dependent values left
out, see tests/itwinai_reference.py) in tests/data/itwinai_reference.json, which
tests/test_itwinai_fidelity.py checks our export against. The training, the readers and the
comparison live in tests/itwinai_reference.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import itwinai_reference as ir  # noqa: E402

REFERENCE_FILE = ROOT / "tests" / "data" / "itwinai_reference.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours-python", default=str(ROOT / ".venv" / "bin" / "python"),
                        help="Python of the virtualenv with itwinai-sync (default: .venv)")
    parser.add_argument("--write-reference", action="store_true",
                        help=f"record the reference's tracker contents in {REFERENCE_FILE}")
    parser.add_argument("--side", choices=["ours"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "ours":  # the child run in our virtualenv
        with tempfile.TemporaryDirectory(prefix="itwinai-sync-ours-") as tmp:
            Path(args.out).write_text(json.dumps(ir.run_ours(Path(tmp))))
        return 0

    with tempfile.TemporaryDirectory(prefix="itwinai-compare-") as tmp:
        reference = ir.run_reference(Path(tmp) / "reference")
        out = Path(tmp) / "ours.json"
        subprocess.run([args.ours_python, __file__, "--side", "ours", "--out", str(out)],
                       check=True)
        ours = json.loads(out.read_text())
    print("itwinai side:", reference["versions"])
    print("our side:    ", ours["versions"])
    for target in ("wandb", "tensorboard", "prov4ml"):
        print(f"  itwinai-sync --to {target}: exit {ours[target]['sync_exit_code']}")
    rows = ir.compare(reference, ours)
    width = max(len(what) for _, what, _ in rows)
    current = None
    for target, what, verdict in rows:
        if target != current:
            print(f"\n== {target}")
            current = target
        print(f"  {what:<{width}}  {verdict}")
    same = sum(verdict == "same" for _, _, verdict in rows)
    print(f"\n{same} of {len(rows)} items the same; the others are listed above "
          "(README: 'What each tracker shows').")
    if args.write_reference:
        REFERENCE_FILE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE_FILE.write_text(json.dumps(ir.without_volatile(reference), indent=1,
                                             sort_keys=True) + "\n")
        print(f"reference written to {REFERENCE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
