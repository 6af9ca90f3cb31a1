"""What one dependent step of a decode step costs at the least: a chain of launches against one persistent launch.

A batch-1 decode step is a chain of ~275 small kernels, each reading what the one before it wrote. This measures
the cost of one link of such a chain when a link does almost nothing (each program reads a 2,048-float row that
every program of the previous link wrote a slice of, and writes its own slice), captured as a CUDA graph and
replayed (the median of `--replays` replays):

- `PDL chain`: one launch per link with programmatic dependent launch (each kernel waits on the previous one with
  `griddepcontrol.wait`), as the decode kernels run;
- `plain chain`: the same launches without PDL;
- `persistent`: one launch whose programs run every link, separated by a software grid barrier (an atomic counter
  each program adds to, then spins on until all have), the alternative to a launch per link.

Prints microseconds a link for each, at 128 and 256 programs.

    python benchmarks/bench_launch_chain.py --links 40
"""

import argparse

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from tune_decode_kernels import graph_time  # (benchmarks/, the script's folder)

D = 2048  # the row every link reads (a hidden state)


@triton.jit
def _link_kernel(src, dst, D, PER: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # One link: the whole row (its sum of squares) and this program's slice of it -> the slice, rescaled.
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    cols = tl.arange(0, BLOCK)
    row = tl.load(src + cols, mask=cols < D, other=0.0)
    mean_square = tl.sum(row * row, axis=0) / D
    mine = tl.program_id(0) * PER + tl.arange(0, PER)
    part = tl.load(src + mine, mask=mine < D, other=0.0)
    tl.store(dst + mine, part * tl.rsqrt(mean_square + 1.0) + 0.001, mask=mine < D)


@triton.jit
def _persistent_kernel(buffers, barrier, D, LINKS: tl.constexpr, PER: tl.constexpr, BLOCK: tl.constexpr):
    # Every link in one launch: the link's work, then a grid barrier (all programs are resident: at most one wave).
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mine = tl.program_id(0) * PER + tl.arange(0, PER)
    for link in range(LINKS):
        src = buffers + (link % 2) * D
        dst = buffers + ((link + 1) % 2) * D
        row = tl.load(src + cols, mask=cols < D, other=0.0, volatile=True)
        mean_square = tl.sum(row * row, axis=0) / D
        part = tl.load(src + mine, mask=mine < D, other=0.0, volatile=True)
        tl.store(dst + mine, part * tl.rsqrt(mean_square + 1.0) + 0.001, mask=mine < D)
        tl.debug_barrier()  # the program's stores before its arrival
        tl.atomic_add(barrier, 1, sem="release", scope="gpu")
        while tl.atomic_add(barrier, 0, sem="acquire", scope="gpu") < (link + 1) * programs:
            pass
        tl.debug_barrier()
    # The last program out resets the counters for the next replay.
    if tl.atomic_add(barrier + 1, 1, sem="acq_rel", scope="gpu") == programs - 1:
        tl.atomic_xchg(barrier, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(barrier + 1, 0, sem="relaxed", scope="gpu")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--links", type=int, default=40)
    parser.add_argument("--replays", type=int, default=50)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{args.links} links a replay, {args.replays} replays")
    for programs in (128, 256):  # of 4 warps: all resident at once (the persistent launch's barrier needs that)
        per = D // programs
        buffers = torch.randn(2, D, device="cuda")
        barrier = torch.zeros(2, dtype=torch.int32, device="cuda")

        def chain(pdl):
            options = {"launch_pdl": True} if pdl else {}
            for link in range(args.links):
                _link_kernel[(programs,)](buffers[link % 2], buffers[(link + 1) % 2], D, PER=per, BLOCK=D, PDL=pdl,
                                          num_warps=4, **options)

        def persistent():
            _persistent_kernel[(programs,)](buffers, barrier, D, LINKS=args.links, PER=per, BLOCK=D, num_warps=4)

        # The three compute the same links: check their results agree before timing them.
        results = []
        for run in (lambda: chain(True), lambda: chain(False), persistent):
            buffers.copy_(torch.randn(2, D, device="cuda", generator=torch.Generator("cuda").manual_seed(0)))
            run()
            results.append(buffers.clone())
        if not all(torch.allclose(r, results[0], rtol=1e-5) for r in results) or barrier.any():
            raise RuntimeError("the chain and the persistent launch disagree (or the barrier was not reset)")
        for name, run in (("PDL chain", lambda: chain(True)), ("plain chain", lambda: chain(False)),
                          ("persistent", persistent)):
            us = graph_time(run, args.replays) * 1e6 / args.links  # the median replay
            print(f"programs {programs:3d}: {name:12s} {us:.2f} us a link")


if __name__ == "__main__":
    main()
