#!/usr/bin/python3
"""The same all-reduce measurement as `ringtrain bench allreduce`, with PyTorch's gloo.

For the baseline column of the README's performance table (issue 8 asks for the ratio to
gloo measured in the same run). Needs Debian's python3-torch (a CPU build with gloo):

    apt-get install python3-torch
    scripts/gloo-allreduce.py --np 4 --sizes 1M,16M,64M           # ranks on 127.0.0.1
    scripts/gloo-allreduce.py --rank R --world N --master IP:PORT  # one rank, e.g. in a netns

Per size: `--warmup` untimed calls, then `--iters` timed ones; an iteration's time is the
slowest rank's; the median is reported with algbw = S/t and busbw = algbw * 2(N-1)/N in
GB/s (1e9 bytes/s), like nccl-tests and ringtrain. The sum is checked against its exact
value. Prints one JSON object per size on rank 0.
"""

import argparse
import json
import os
import statistics
import sys
import time


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def run_rank(rank, world, master, sizes, iters, warmup):
    import torch
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://{master}", rank=rank, world_size=world
    )
    for size in sizes:
        n = size // 4
        buf = torch.empty(n, dtype=torch.float32)
        times = []
        bad = 0
        for i in range(warmup + iters):
            # Small integers: every sum is exact whatever the order.
            buf.fill_(float(rank + 1))
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(buf)
            took = time.perf_counter() - t
            want = world * (world + 1) / 2
            bad += int((buf != want).sum())
            if i >= warmup:
                times.append(took)
        slowest = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        bad_all = torch.tensor([bad], dtype=torch.int64)
        dist.all_reduce(bad_all)
        if rank == 0:
            t = statistics.median(slowest.tolist())
            algbw = size / t / 1e9
            record = {
                "impl": "gloo",
                "size_bytes": size,
                "world_size": world,
                "iters": iters,
                "time_ms_median": t * 1e3,
                "algbw": algbw,
                "busbw": algbw * 2 * (world - 1) / world,
                "correct": int(bad_all) == 0,
            }
            print(json.dumps(record), flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--np", type=int, default=2, help="ranks to start on 127.0.0.1")
    p.add_argument("--rank", type=int, help="run only this rank (with --world, --master)")
    p.add_argument("--world", type=int)
    p.add_argument("--master", default="127.0.0.1:29611", help="rank 0's IP:PORT")
    p.add_argument("--sizes", default="1M,16M,64M")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    if a.rank is not None:
        if a.world is None:
            sys.exit("--rank needs --world")
        run_rank(a.rank, a.world, a.master, sizes, a.iters, a.warmup)
        return
    children = []
    for r in range(a.np):
        argv = [sys.executable, __file__, "--rank", str(r), "--world", str(a.np)]
        argv += ["--master", a.master, "--sizes", a.sizes]
        argv += ["--iters", str(a.iters), "--warmup", str(a.warmup)]
        children.append(os.spawnv(os.P_NOWAIT, sys.executable, argv))
    failed = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        failed += status != 0
    if failed:
        sys.exit(f"{failed} gloo rank(s) failed")


if __name__ == "__main__":
    main()
