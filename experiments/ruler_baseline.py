"""How often the uncompressed default model solves each retrieval task, per context length.

    PYTHONPATH=src python experiments/ruler_baseline.py --contexts 1024,4096 --per-task 10

Asks ``--per-task`` cases of every task of ``--tasks`` (a task set of
``kvcompress.bench.retrieval.TASK_SETS`` or comma-separated task names) at each context length,
through the harness's ``none`` row (``kvcompress.generate(..., method="none")``), one thread; prints
a table of correct cases and mean recall per task and length; with ``--out FILE``, writes every
reply there (JSON lines) to read the misses.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import kvcompress
from kvcompress.bench.methods import resolve
from kvcompress.bench.retrieval import make_cases, run_retrieval, task_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="ruler")
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--per-task", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON lines file for every case and reply")
    args = parser.parse_args()
    tasks = args.tasks if args.tasks in ("default", "ruler") else tuple(args.tasks.split(","))
    count = args.per_task * len(task_names(tasks))
    torch.set_num_threads(1)
    model, tokenizer = kvcompress.load_model()
    method = resolve("none")
    rows = []
    replies = []
    for context in map(int, args.contexts.split(",")):
        start = time.perf_counter()
        result = run_retrieval(method, model, tokenizer, make_cases(tokenizer, context, count, args.seed, tasks))
        replies += [{"context": context, **r} for r in result["results"]]
        for task, (correct, total) in result["by_task"].items():
            rows.append((context, task, correct, total, result["recall_by_task"][task]))
        print(f"C={context}: {result['correct']}/{result['cases']} in {time.perf_counter() - start:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in replies)
    print(f"\nmodel {kvcompress.models.DEFAULT_MODEL}, float32, cpu, 1 thread, method none, seed {args.seed}")
    print(f"{'C':>6} {'task':14} {'correct':>9} {'recall':>7}")
    for context, task, correct, total, found in rows:
        print(f"{context:>6} {task:14} {correct:>4}/{total:<4} {found:7.2f}")


if __name__ == "__main__":
    main()
