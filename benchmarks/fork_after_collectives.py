"""How often a worker process started right after a collective hangs: fork against a fork server.

Two gloo processes (a DDP job on the CPU) each repeat: two all-reduces of tensors Python lets go of at once (as
Lightning's epoch-end checks do), then start one process the way a DataLoader starts its workers, which sets its
threads and makes a tensor (as torch's worker loop does first) and exits. A child that has not exited within
``--patience`` seconds hangs: with ``fork`` it inherited the interpreter's runtime lock held by the gloo thread that
was freeing the tensor (CPython gh-112275; ``mrcnn.data.datamodule.worker_context``). Each process prints one JSON
line: its rank, the start method, the children started and those that hung.

    python benchmarks/fork_after_collectives.py --start-method fork --rounds 5000
    python benchmarks/fork_after_collectives.py --start-method forkserver --rounds 5000

Results and the hang's stack: benchmarks/README.md, "Loader workers started right after a collective".
"""

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist


def _child() -> None:
    torch.set_num_threads(1)
    torch.zeros(1).add_(1)


def _rank(rank: int, store: str, start_method: str, rounds: int, patience: float) -> None:
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload(["torch"])
    hung, started = 0, 0
    start = time.monotonic()
    for round_ in range(rounds):
        # Python lets go of each tensor first, so gloo's thread frees it: a plain all-reduce (as Lightning's
        # reduce_boolean_decision) and one waited on through its work (as DDP's buckets).
        flag = torch.tensor([round_])
        dist.all_reduce(flag)
        del flag
        work = dist.all_reduce(torch.tensor([round_]), async_op=True)
        work.wait()
        del work
        child = context.Process(target=_child)
        child.start()
        started += 1
        child.join(patience)
        if child.is_alive():
            hung += 1
            child.kill()
            child.join()
    seconds = time.monotonic() - start
    print(json.dumps({"rank": rank, "start_method": start_method, "started": started, "hung": hung, "s": seconds}))
    sys.stdout.flush()
    os._exit(0)  # without the process group's teardown, which waits for the peer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start-method", choices=["fork", "forkserver", "spawn"], default="fork")
    parser.add_argument("--rounds", type=int, default=2000, help="children each of the 2 processes starts")
    parser.add_argument("--patience", type=float, default=30.0, help="seconds before a child counts as hung")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        _rank(args.rank, args.store, args.start_method, args.rounds, args.patience)
        return
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        command = [sys.executable, __file__, "--start-method", args.start_method, "--rounds", str(args.rounds)]
        command += ["--patience", str(args.patience), "--store", store]
        ranks = [subprocess.Popen([*command, "--rank", str(rank)]) for rank in range(2)]
        sys.exit(max(rank.wait() for rank in ranks))


if __name__ == "__main__":
    main()
