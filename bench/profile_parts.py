"""Group a py-spy profile of a worker by the part of the send path each sample was in.

Run by hand on a file `bench/throughput.py` wrote with BENCH_PROFILE_DIR (py-spy's raw,
collapsed stacks): `.venv/bin/python bench/profile_parts.py /tmp/prof/worker0-*.txt`. Each sample
goes to the first part named by its innermost frame that names one; the shares are of all
samples, the process's start-up included ("start-up and threads").
"""

from __future__ import annotations

import collections
import sys

PARTS = [  # (text in a frame, part), looked for from the innermost frame outwards
    ("_record (dispatcher/dispatch.py", "record"), ("_store (", "record"), ("settle", "settle"),
    ("_log_outcomes", "settle"), ("mark_started", "start"), ("Starts.", "start"), ("_Coalesced", "start"),
    ("BulkSlots", "rate limit"), ("admit (", "rate limit"), ("limiter", "rate limit"),
    ("build_request", "build request"), ("parse_response", "parse answer"),
    ("http1.py", "way out and back"), ("Wire.", "way out and back"), ("send_all", "way out and back"),
    ("asyncio", "way out and back"), ("uvloop", "way out and back"),
    ("_claim_what_fits", "claim"), ("waiting (", "claim"), ("claim (", "claim"),
    ("dispatch_batch", "claim"), ("celery", "celery and kombu"), ("kombu", "celery and kombu"),
]


def parts(path: str) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    with open(path) as fh:
        for line in fh:
            stack, _, n = line.rstrip().rpartition(" ")
            part = next((p for frame in reversed(stack.split(";")) for text, p in PARTS if text in frame),
                        "start-up and threads")
            counts[part] += int(n)
    return counts


def main() -> None:
    for path in sys.argv[1:]:
        counts = parts(path)
        total = sum(counts.values()) or 1
        print(f"{path}: {total} samples")
        for part, n in counts.most_common():
            print(f"  {100 * n / total:5.1f}%  {part}")


if __name__ == "__main__":
    main()
