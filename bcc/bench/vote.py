"""`bench_vote`: what one preemption vote (`PreemptionFlag.agreed`, a gloo all-reduce of one int) costs
with N processes on this machine, per vote and per optimizer step at a given `train.preempt_check_steps`.

The processes are forked on one host and talk over loopback TCP, as ranks of one node do; across nodes
the network's latency adds to each vote (a tree/ring all-reduce takes O(log N) to O(N) hops).
"""

from __future__ import annotations

import socket
import statistics
import time
from dataclasses import dataclass

from bcc.bench import Progress, quiet


@dataclass(frozen=True)
class VotePoint:
    processes: int
    votes: int
    microseconds: list[float]  # per vote, rank 0's timings (every rank waits for the slowest anyway)

    @property
    def median_us(self) -> float:
        return statistics.median(self.microseconds)

    @property
    def p90_us(self) -> float:
        return statistics.quantiles(self.microseconds, n=10)[-1] if len(self.microseconds) > 1 else self.median_us


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, votes: int, warmup: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from bcc.train.preempt import PreemptionFlag

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        flag = PreemptionFlag(install_handlers=False)
        for _ in range(warmup):
            flag.agreed()
        dist.barrier()
        times = []
        for _ in range(votes):
            t0 = time.perf_counter()
            flag.agreed()
            times.append(1e6 * (time.perf_counter() - t0))
        if rank == 0:
            queue.put(times)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def bench_vote(processes=(2, 4, 8), *, votes: int = 500, warmup: int = 20, progress: Progress = quiet
               ) -> list[VotePoint]:
    """Per-vote time of the preemption vote with each number of gloo processes on this host (forked)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork")
    out = []
    for n in processes:
        progress(f"{n} processes: {votes} votes")
        queue = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_rank, args=(r, n, port, votes, warmup, queue)) for r in range(n)]
        for p in procs:
            p.start()
        try:
            times = queue.get(timeout=120 + votes * 0.1)
        except Exception:  # queue.Empty: a rank died before rank 0 could finish
            times = None
        for p in procs:
            p.join(timeout=60)
            if p.exitcode is None:
                p.kill()
        if times is None or any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a vote benchmark process failed: exit codes {[p.exitcode for p in procs]}")
        out.append(VotePoint(n, votes, times))
    return out
