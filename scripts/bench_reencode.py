"""Re-encode a bundle while another process keeps searching it (issue #11's zero-downtime check).

    .venv/bin/python scripts/bench_reencode.py [--bundle indexes/scifact] [--preset fast]

The bundle is copied first (the original is left alone). A reader process searches the copy in a loop,
calling refresh() between searches, while this process runs `Matcher.reencode` (the bundled MiniLM, with the
given preset). Prints the re-encode's wall time, the reader's searches, errors and the generations it answered
from, and writes JSON (results/bench_reencode.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from matching.matcher import Matcher  # noqa: E402

READER = """
import json, sys, time
from matching import Matcher
path, flag = sys.argv[1], sys.argv[2]
searches, errors, generations = 0, [], []
with Matcher.load(path, verify=False, allow_encoder_mismatch=True) as m:
    print("ready", flush=True)
    import os
    while not os.path.exists(flag):
        try:
            hits = m.search("cholesterol and heart disease", 10)
            if len(hits) != 10:
                errors.append(f"{len(hits)} hits")
            searches += 1
            if not generations or generations[-1] != m.generation:
                generations.append(m.generation)
            m.refresh()
        except Exception as exc:
            errors.append(repr(exc))
print(json.dumps({"searches": searches, "errors": len(errors), "examples": errors[:3], "generations": generations}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=ROOT / "indexes" / "scifact")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_reencode.json")
    args = parser.parse_args()
    work = ROOT / "results" / "reencode"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    copy = work / "bundle"
    shutil.copytree(args.bundle, copy)
    flag = work / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(copy), str(flag)], stdout=subprocess.PIPE, text=True)
    assert reader.stdout is not None
    assert reader.stdout.readline().strip() == "ready"
    with Matcher.load(copy, verify=False) as m:
        count, before = len(m), m.manifest.encoder["fingerprint"]
        start = time.perf_counter()
        m.reencode(preset=args.preset, show_progress=False)
        wall = time.perf_counter() - start
        after = m.manifest.encoder["fingerprint"]
    time.sleep(2.0)  # the reader moves to the new generation at its next refresh
    flag.touch()
    seen = json.loads(reader.communicate(timeout=120)[0].strip().splitlines()[-1])
    report = {
        "bundle": str(args.bundle),
        "titles": count,
        "preset": args.preset,
        "reencode_seconds": wall,
        "fingerprint": [before, after],
        "reader": seen,
    }
    print(
        f"re-encoded {count} titles ({args.preset}) in {wall:.1f} s while a reader searched: "
        f"{seen['searches']} searches, {seen['errors']} errors, generations {seen['generations']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
