"""fairseq's product-quantization k-means (``fairseq.modules.quantization.pq.em.EM``) on given
sub-vector matrices, timed in its own process: run by benchmarks/pq_speed.py with the Python of a
separate virtual environment that has ``fairseq-fixed`` (it must not share slimtorch's).

    python benchmarks/fairseq_em.py IN.pt OUT.pt [--threads 1]

IN.pt: {name: {"blocks": (n, d) float32, "init": (K, d) float32, "n_iter": int}}. fairseq's EM
takes W as (d, n) (its PQ reshapes a weight to (block_size, n_subvectors)); its centroids are set
to ``init`` instead of its own ``initialize_centroids`` (random columns drawn with replacement), so
both implementations start from the same centroids. Then ``EM.step(i)`` n_iter times, as fairseq's
``PQ.encode`` does (stopping at ``EmptyClusterResolveError`` as it does). OUT.pt: {name:
{"centroids", "codes", "seconds", "iterations", "error"}} plus "versions". Standalone: no slimtorch."""
from __future__ import annotations

import argparse
import random
import time

import torch


def run(blocks: torch.Tensor, init: torch.Tensor, n_iter: int) -> dict:
    from fairseq.modules.quantization.pq.em import EM, EmptyClusterResolveError
    em = EM(blocks.t().contiguous(), n_centroids=init.shape[0], n_iter=n_iter, verbose=False)
    em.centroids = init.clone()
    error, done = None, 0
    t = time.perf_counter()
    for i in range(n_iter):
        try:
            em.step(i)
        except EmptyClusterResolveError:
            error = "EmptyClusterResolveError"
            break
        done += 1
    seconds = time.perf_counter() - t
    return {"centroids": em.centroids.clone(), "codes": em.assignments.clone(), "seconds": seconds,
            "iterations": done, "error": error}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inp")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)
    import fairseq
    jobs = torch.load(args.inp, weights_only=True)
    out = {"versions": {"fairseq": str(fairseq.__version__), "torch": str(torch.__version__),
                        "threads": torch.get_num_threads()}}
    for name, job in jobs.items():
        out[name] = run(job["blocks"], job["init"], int(job["n_iter"]))
        print(f"{name}: {out[name]['seconds']:.1f} s, {out[name]['iterations']} iterations", flush=True)
    torch.save(out, args.out)


if __name__ == "__main__":
    main()
