"""``python -m convflat.bench gemm``: batched matrix products at the shapes of the closed form.

The per-sample products of ``exact_curvature`` are batched GEMMs of small matrices (for the
width-16 gapcnn's last conv: the phase Grams 64 x 32 x 64, ``S Q`` and ``S Q S^T``
64 x 64 x 64). Their rate on a machine bounds how close ``exact_curvature`` can come to one
forward pass there: this prints the median multiply-adds per second of ``torch.matmul`` on
``--batch`` such products, float64 and float32, for each ``--shapes`` entry ``MxKxN``.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    """Run the GEMM rates with the command-line arguments ``argv``; prints the table."""
    ap = argparse.ArgumentParser(prog="python -m convflat.bench gemm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="64x32x64,64x64x64,16x512x16,256x16x256",
                    help="comma-separated MxKxN (default: the gapcnn and ResNet-18 shapes)")
    ap.add_argument("--batch", type=int, default=64, help="products per call (default 64)")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    shapes = []
    for shape in args.shapes.split(","):
        try:
            m, k, n = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {shape!r} is not MxKxN") from None
        shapes.append((m, k, n))
    device = torch.device(args.device)
    print(f"# device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, median of {args.repeats}")
    print("| M x K x N | float64 GMAC/s | float32 GMAC/s |")
    print("|---|---|---|")
    for m, k, n in shapes:
        rates = []
        for dt in (torch.float64, torch.float32):
            a = torch.randn(args.batch, m, k, dtype=dt, device=device)
            b = torch.randn(args.batch, k, n, dtype=dt, device=device)
            out = torch.empty(args.batch, m, n, dtype=dt, device=device)
            ts = []
            for _ in range(args.repeats + 1):  # the first call warms up
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                torch.matmul(a, b, out=out)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                ts.append(time.perf_counter() - t0)
            rates.append(args.batch * m * k * n / statistics.median(ts[1:]) / 1e9)
        print(f"| {m} x {k} x {n} | {rates[0]:.3g} | {rates[1]:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
