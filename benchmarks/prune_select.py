"""Time diversity neuron selection (one round of D picks) against the official loop and scipy.

    python benchmarks/prune_select.py [--shapes 1408x6144 1792x15360] [--repeats 3]

Default shapes are the fc1 layers of ViT-g-14 (D=1408, H=6144) and EVA-E (D=1792, H=15360).
The official DGMR loop recomputes every residual norm and rewrites the whole residual matrix per
pick; it is timed on --official-picks picks and extrapolated linearly to D picks (every pick
costs the same). Prints a Markdown table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np
import scipy.linalg

from dgmr_jax.prune.select import select_neurons

try:
    import torch
except ImportError:  # torch is optional: its row is skipped
    torch = None


# Ratio columns: short label -> the method name it divides by.
REFERENCES = {
    "official numpy": "official loop, numpy",
    "official torch": "official loop, torch",
    "scipy f32": "scipy qr(pivoting=True, mode='r') f32",
}


def official_numpy(rows: np.ndarray, picks: int) -> list[int]:
    """The official loop ported to NumPy: rows are neuron vectors (PyTorch fc1.weight layout)."""
    r = rows.copy()
    chosen = []
    for _ in range(picks):
        norms = np.linalg.norm(r, axis=1)
        p = int(np.argmax(norms))
        chosen.append(p)
        u = r[p] / norms[p]
        r = r - (r @ u)[:, None] * u
    return chosen


def official_torch(rows: torch.Tensor, picks: int) -> list[int]:
    """The official PyTorch loop, CPU."""
    r = rows.clone()
    chosen = []
    for _ in range(picks):
        norms = torch.norm(r, dim=1)
        p = int(torch.argmax(norms))
        chosen.append(p)
        u = r[p] / norms[p]
        r = r - (r @ u)[:, None] * u
    return chosen


def bench_shape(d: int, h: int, repeats: int, official_picks: int) -> list[tuple[str, float]]:
    """(method, median seconds for one round of D picks) for every route at one fc1 shape.

    Methods run round-robin, so load from other processes hits all of them alike.
    """
    kernel = (0.02 * np.random.default_rng(0).standard_normal((d, h))).astype(np.float32)
    rows = np.ascontiguousarray(kernel.T)
    picks = min(official_picks, d)
    scale = d / picks
    tag = f" (x{scale:.1f} from {picks} picks)" if picks < d else ""
    methods: list[tuple[str, Callable[[], object], float]] = [
        (f"official loop, numpy f32{tag}", lambda: official_numpy(rows, picks), scale),
    ]
    if torch is not None:
        trows = torch.from_numpy(rows)
        name = f"official loop, torch f32 ({torch.get_num_threads()} threads){tag}"
        methods.append((name, lambda: official_torch(trows, picks), scale))
    for w in (kernel, kernel.astype(np.float64)):
        name = f"scipy qr(pivoting=True, mode='r') {'f32' if w.dtype == np.float32 else 'f64'}"
        methods.append((name, lambda w=w: scipy.linalg.qr(w, pivoting=True, mode="r"), 1.0))
    for backend in ("lapack", "gram_schmidt"):
        start = time.perf_counter()
        select_neurons(kernel, d, backend=backend)  # compiles
        print(f"{d}x{h} ours {backend}: first call {time.perf_counter() - start:.2f} s (includes compile)")
        fn = lambda backend=backend: select_neurons(kernel, d, backend=backend)  # noqa: E731
        methods.append((f"ours, backend={backend} f32", fn, 1.0))

    times: dict[str, list[float]] = {name: [] for name, _, _ in methods}
    for _ in range(repeats):
        for name, fn, factor in methods:
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(factor * (time.perf_counter() - start))
    return [(name, statistics.median(times[name])) for name, _, _ in methods]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1408x6144", "1792x15360"], help="DxH fc1 shapes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    parser.add_argument("--official-picks", type=int, default=64, help="picks timed for the official loop")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.default_backend()}, numpy {np.__version__}, scipy {scipy.__version__}")

    table = []
    for shape in args.shapes:
        d, h = (int(s) for s in shape.lower().split("x"))
        results = dict(bench_shape(d, h, args.repeats, args.official_picks))
        refs = [next((s for name, s in results.items() if name.startswith(p)), None) for p in REFERENCES.values()]
        for name, seconds in results.items():
            ratios = [f"{ref / seconds:.1f}x" if ref else "-" for ref in refs]
            table.append(f"| {d}x{h} | {name} | {seconds:.3f} | " + " | ".join(ratios) + " |")

    print("\n| shape (DxH) | method | seconds | " + " | ".join(f"{r} / this" for r in REFERENCES) + " |")
    print("|---|---|---:|" + "---:|" * len(REFERENCES))
    print("\n".join(table))


if __name__ == "__main__":
    main()
