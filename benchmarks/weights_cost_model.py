"""Project an RL weight update at scale from the rates bench_weights.py measured.

The model (docs/guide-rl-weights.md, "Cost model"): every inference replica needs the whole
model in its wire dtype; each inference GPU receives its 1/g share of a replica (g GPUs per
replica), each trainer GPU sends 1/T of all replicas' bytes; NICs are full duplex and the
schedule spreads bytes evenly, so

    transfer = max(bytes received per inference GPU, bytes sent per trainer GPU) / (NIC rate × eff)
    update   = transfer + writes per trainer GPU × per-write cost + handshake (ready + fp8 amax)
               + one chunk of casting that can't overlap (chunk / cast rate)

``eff`` comes from a bench_weights.py result: the round's floor (its bytes over the raw C
program's throughput, same provider, same run) over the round's measured time — so it carries
every overhead of the measured round (casting on the CPU, scheduling, per-write costs) as a
loss of bandwidth.  The per-write cost (``--write-us``, posting one paged-write call from
Python) and the rest are arguments.

    python benchmarks/weights_cost_model.py [--results benchmarks/results/weights-latest.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project(params: float, trainers: int, inference: int, per_replica: int, wire_bytes: float, nic_gbps: float,
            eff: float, write_us: float, writes_per_gpu: float, handshake_us: float, chunk_mb: float,
            cast_gbps: float) -> dict[str, float]:
    replicas = inference // per_replica
    recv = params * wire_bytes / per_replica  # bytes into each inference GPU
    send = params * wire_bytes * replicas / trainers  # bytes out of each trainer GPU
    rate = nic_gbps / 8 * 1e9 * eff
    transfer = max(recv, send) / rate
    fixed = writes_per_gpu * write_us * 1e-6 + handshake_us * 1e-6 + chunk_mb * 2**20 / (cast_gbps * 1e9)
    return {"replicas": replicas, "recv_GB": recv / 1e9, "send_GB": send / 1e9, "transfer_s": transfer,
            "fixed_s": fixed, "total_s": transfer + fixed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "benchmarks/results/weights-latest.json"))
    ap.add_argument("--provider", default="shm", help="which measured provider feeds eff and per-write cost")
    ap.add_argument("--params", type=float, default=1e12)
    ap.add_argument("--trainers", type=int, default=256)
    ap.add_argument("--inference", type=int, default=128)
    ap.add_argument("--nic-gbps", type=float, default=400.0, help="per GPU")
    ap.add_argument("--wire-bytes", type=float, default=1.0, help="bytes per parameter on the wire (fp8: 1)")
    ap.add_argument("--cast-gbps", type=float, default=1000.0, help="GPU cast/quantize rate, GB/s of output")
    ap.add_argument("--handshake-us", type=float, default=100.0, help="ready words + fp8 amax exchange")
    ap.add_argument("--write-mb", type=float, default=64.0, help="typical write size at scale")
    ap.add_argument("--write-us", type=float, default=20.0, help="cost of posting one write call")
    args = ap.parse_args()

    res = json.loads(Path(args.results).read_text())
    sysm = res["systems"][f"aiote-{args.provider}"]
    med = statistics.median(sysm["times"])
    eff = min(1.0, sysm["floor_s"] / med)
    write_us = args.write_us
    print(f"measured ({args.results}, {args.provider}): round {med:.3f} s, floor {sysm['floor_s']:.3f} s -> "
          f"eff {eff:.2f}")
    print(f"projection: {args.params / 1e12:g} T params, {args.trainers} trainer -> {args.inference} inference "
          f"GPUs, {args.nic_gbps:g} Gbps per GPU, {args.wire_bytes:g} B/param on the wire")
    print("| GPUs per inference replica | replicas | GB into each inference GPU | GB out of each trainer GPU "
          "| transfer s (eff) | fixed s | **total s** | at eff 1.0 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for g in (128, 64, 32, 16, 8):
        if args.inference % g:
            continue
        total_bytes_per_trainer = args.params * args.wire_bytes * (args.inference // g) / args.trainers
        wpg = total_bytes_per_trainer / (args.write_mb * 2**20)
        kw = dict(params=args.params, trainers=args.trainers, inference=args.inference, per_replica=g,
                  wire_bytes=args.wire_bytes, nic_gbps=args.nic_gbps, write_us=write_us, writes_per_gpu=wpg,
                  handshake_us=args.handshake_us, chunk_mb=args.write_mb, cast_gbps=args.cast_gbps)
        p = project(eff=eff, **kw)
        ideal = project(eff=1.0, **kw)
        print(f"| {g} | {p['replicas']} | {p['recv_GB']:.1f} | {p['send_GB']:.1f} | {p['transfer_s']:.3f} "
              f"| {p['fixed_s']:.3f} | **{p['total_s']:.2f}** | {ideal['total_s']:.2f} |")


if __name__ == "__main__":
    main()
