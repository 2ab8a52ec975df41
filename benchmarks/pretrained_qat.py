"""Issue 11: recovering 4 bits without labels. Quantization-aware training of the pretrained
EfficientNet-Lite1 by distillation from its FP32 self on unlabeled images (the LSQ+ paper's
EfficientNet setting, at CPU scale): ``quantize_`` + ``calibrate`` with the defaults, then a plain
loop of ``distill_loss`` (KL to the FP32 logits, no labels) on a pool of random crops of the calibration
source images (disjoint from the test images; the teacher runs on every batch inside the clock), BatchNorm statistics frozen. Judged by top-1
agreement and logit cosine with FP32 on the 256 test crops of benchmarks/pretrained_ptq.py, at
checkpoints; the training clock excludes the evaluations.

    PYTHONPATH=src python -m benchmarks.pretrained_qat --minutes 20        # W4A4, writes RESULTS.md
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

import slimtorch as st
from benchmarks import pretrained_ptq as P

SECTION = "Pretrained W4A4 by unlabeled distillation QAT (issue 11)"


def fidelity(model, test, ref) -> dict:
    out = P.logits(model.eval(), test)
    return {"agreement": 100.0 * (out.argmax(1) == ref.argmax(1)).float().mean().item(),
            "cosine": F.cosine_similarity(out, ref, dim=1).mean().item()}


def param_groups(model, lr_w: float, lr_q: float) -> list[dict]:
    """Quantizer step sizes / offsets at ``lr_q``, everything else (weights, biases, BN affine) at ``lr_w``."""
    from slimtorch.quant.quantizer import Quantizer
    q = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters(recurse=False)}
    ps = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in ps if id(p) not in q], "lr": lr_w},
            {"params": [p for p in ps if id(p) in q], "lr": lr_q}]


def run(w_bits: int, a_bits: int, minutes: float, batch: int, lr_w: float, lr_q: float, T: float,
        evals: int, pool_size: int = 512, log=print) -> list[dict]:
    torch.manual_seed(0)
    teacher = P.load_model()
    calib, test = P.make_data()
    ref = P.logits(teacher, test)
    student = copy.deepcopy(teacher)
    t = time.perf_counter()
    st.quantize_(student, st.LSQPlus(w_bits=w_bits, a_bits=a_bits))
    st.calibrate(student, P.batches(calib))
    calib_s = time.perf_counter() - t
    rows = [dict(step=0, train_s=0.0, calib_s=calib_s, **fidelity(student, test, ref))]
    log(rows[-1])
    opt = torch.optim.Adam(param_groups(student, lr_w, lr_q))
    pool = P.crops(P.CALIB_IMAGES, pool_size, 240, seed=100_000)   # decoded once, like a data loader's cache
    g = torch.Generator().manual_seed(1)
    order = torch.empty(0, dtype=torch.long)
    budget, step, trained = minutes * 60.0, 0, 0.0
    marks = [budget * (i + 1) / evals for i in range(evals)]
    while trained < budget:
        if len(order) < batch:                          # a new epoch over the pool, reshuffled
            order = torch.randperm(pool_size, generator=g)
        x, order = pool[order[:batch]], order[batch:]
        t = time.perf_counter()
        with torch.no_grad():
            target = teacher(x)
        student.eval()                                  # BN statistics frozen, as fine-tuning does
        loss = st.distill_loss(student(x), target, T=T)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for grp in opt.param_groups:                    # cosine decay over the time budget
            grp.setdefault("lr0", grp["lr"])
            grp["lr"] = grp["lr0"] * 0.5 * (1 + torch.cos(torch.tensor(min(trained / budget, 1.0) * torch.pi)).item())
        opt.step()
        step += 1
        trained += time.perf_counter() - t
        if marks and trained >= marks[0]:
            marks.pop(0)
            rows.append(dict(step=step, train_s=trained, loss=loss.item(), **fidelity(student, test, ref)))
            log(rows[-1])
    return rows


def body(args, rows, secs_per_step: float) -> str:
    import os
    head = (f"EfficientNet-Lite1 (pretrained), W{args.w_bits}A{args.a_bits} with the defaults "
            f"(`LSQPlus(w_bits={args.w_bits}, a_bits={args.a_bits})`, `calibrate` on the 32 calibration crops), "
            f"then QAT by distillation (`distill_loss`, T={args.T}, no labels) on a pool of {args.pool} random crops of "
            f"the calibration source images (decoded once), batch {args.batch}, Adam (weights {args.lr_w}, quantizer steps "
            f"{args.lr_q}, cosine decay over the budget), BN statistics frozen, {args.minutes:g} min of training "
            f"on {torch.get_num_threads()} threads ({secs_per_step:.2f} s/step; load average "
            f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}). Fidelity to FP32 on the 256 test crops "
            "(disjoint source images), not accuracy.")
    last = rows[-1]
    goal = (f"**Goal** (issue 11): W4A4 after unlabeled distillation QAT (<= 20 min on 2 cores) >= 80% top-1 "
            f"agreement: {last['agreement']:.1f}% after {last['train_s'] / 60:.1f} min: "
            f"**{'met' if last['agreement'] >= 80 and last['train_s'] <= 1200 else 'NOT met'}**")
    table = ["| training | steps | top-1 agreement % | logit cosine |", "|---|---|---|---|"]
    table += [f"| {r['train_s'] / 60:.1f} min | {r['step']} | {r['agreement']:.1f} | {r['cosine']:.4f} |" for r in rows]
    return "\n\n".join([head, goal, "\n".join(table),
                        f"Step 0 is the PTQ starting point (calibration {rows[0]['calib_s']:.1f} s)."])


def main(argv=None):
    from benchmarks.results import write_section
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr-w", type=float, default=1e-5)
    ap.add_argument("--lr-q", type=float, default=1e-4)
    ap.add_argument("--T", type=float, default=1.0)
    ap.add_argument("--pool", type=int, default=512, help="unlabeled training crops, decoded once")
    ap.add_argument("--evals", type=int, default=5, help="fidelity checkpoints over the budget")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.w_bits, args.a_bits, args.minutes, args.batch, args.lr_w, args.lr_q, args.T, args.evals, args.pool,
               log=lambda r: print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, flush=True))
    steps = rows[-1]["step"]
    text = body(args, rows, rows[-1]["train_s"] / max(steps, 1))
    print(text)
    if not args.no_write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
