"""Command line: the demo, one service process, or a torchrun-launched service.

    python -m examples.kvcache [demo] [--provider shm|tcp] [--requests N] [--crash decode] ...
    python -m examples.kvcache worker --role router|prefill|decode --store HOST:PORT --prefix P
    torchrun --nproc-per-node 6 -m examples.kvcache torchrun --prefill 2 --decode 2
"""

from __future__ import annotations

import argparse
import asyncio
import sys

__all__ = ["main"]


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", default="shm", choices=["shm", "tcp"])
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-file", default=None,
                   help="structlog JSON lines of every process (default: a temp dir)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the numbers here")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        argv = ["demo", *argv]
    ap = argparse.ArgumentParser(prog="python -m examples.kvcache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="the demo on this host (default)")
    _demo_args(d)
    d.add_argument("--prefill", type=int, default=2)
    d.add_argument("--decode", type=int, default=1)
    d.add_argument("--no-scale", dest="scale", action="store_false", help="keep the worker set fixed")
    d.add_argument("--crash", choices=["decode", "prefill"], default=None,
                   help="also SIGKILL a busy worker of this role mid-run")

    w = sub.add_parser("worker", help="one process of the service (router, prefill or decode)")
    w.add_argument("--role", required=True, choices=["router", "prefill", "decode"])
    w.add_argument("--name", default=None)
    w.add_argument("--store", required=True, help="TCPStore HOST:PORT")
    w.add_argument("--prefix", required=True, help="key prefix of the run in the store")
    w.add_argument("--log-file", default=None)

    t = sub.add_parser("torchrun", help="under torchrun: rank 0 client, 1 router, then prefill, then decode")
    _demo_args(t)
    t.add_argument("--prefill", type=int, default=1)
    t.add_argument("--decode", type=int, default=1)

    args = ap.parse_args(argv)
    if args.cmd == "demo":
        from .demo import DemoOptions, run_demo

        opts = DemoOptions(**{k: v for k, v in vars(args).items() if k != "cmd"})
        return asyncio.run(run_demo(opts))
    if args.cmd == "worker":
        from .node import run_worker

        host, _, port = args.store.rpartition(":")
        return asyncio.run(run_worker(args.role, args.name or args.role, host, int(port), args.prefix,
                                      args.log_file))
    from .node import run_torchrun

    return asyncio.run(run_torchrun(args))


if __name__ == "__main__":
    sys.exit(main())
