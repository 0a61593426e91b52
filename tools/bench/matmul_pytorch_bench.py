"""PyTorch side of `cargo xtask bench matmul`: `F.linear` (x @ wᵀ) throughput in f32 at
the shapes given, with `--threads` intra-op threads. Prints one JSON object
{"threads", "torch", "results": [{"m", "k", "n", "median_ms", "gflops"}]}."""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--shapes", required=True, help="m:k:n,m:k:n,...")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = []
    with torch.inference_mode():
        for spec in a.shapes.split(","):
            m, k, n = (int(v) for v in spec.split(":"))
            x = torch.randn(m, k)
            w = torch.randn(n, k)
            F.linear(x, w)
            ts = []
            for _ in range(a.iters):
                t0 = time.perf_counter()
                F.linear(x, w)
                ts.append((time.perf_counter() - t0) * 1000.0)
            med = statistics.median(ts)
            out.append({"m": m, "k": k, "n": n, "median_ms": med, "gflops": 2.0 * m * k * n / med / 1e6})
    print(json.dumps({"threads": a.threads, "torch": torch.__version__, "results": out}))


if __name__ == "__main__":
    main()
