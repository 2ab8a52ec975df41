"""Worker functions for tests/test_distributed.py (module level so spawned processes can import them)."""
import copy
import datetime
import json
import traceback

import torch
import torch.distributed as dist
from torch import nn

import slimtorch as st
from slimtorch import distributed as D
from slimtorch.train import TrainConfig, train


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def batches(n=6, bs=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(bs, 12, generator=g) * 2
        out.append((x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()))
    return out


QUANT = st.LSQPlus(w_bits=4, a_bits=4, a_init="minmax")


def run_job(rank, world, tmp, job):
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
    try:
        result = JOBS[job](rank, world, tmp)
    except Exception as e:          # reported to the test through the file
        result = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    with open(f"{tmp}/out-{job}-{world}-{rank}.json", "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.barrier()              # both ranks done before either tears gloo down (else: SIGABRT now and then)
        dist.destroy_process_group()


def _state(m):
    return {k: v.tolist() for k, v in m.state_dict().items()}


def job_train(rank, world, tmp):
    """Quantize, calibrate on this rank's rows, train 2 epochs on global batches of 16."""
    m = st.quantize_(net(), QUANT)
    data = batches()
    st.calibrate(m, [D.shard(b) for b in data[:2]], rounding="nearest")   # QAT follows, as in the pipeline
    train(m, lambda e: data, TrainConfig(epochs=2, lr=5e-3, batch_size=16, progress=False, seed=0))
    return {"state": _state(m)}


def job_calibrate(rank, world, tmp):
    """Each rank calibrates on different data; world 1 sees the concatenation."""
    out = {}
    for a_init in ("minmax", "mse_hist", "percentile"):
        m = st.quantize_(net(), st.LSQ(w_bits=4, a_bits=4, a_init=a_init))
        data = batches(4, 16, seed=7)
        if world > 1:
            data = [D.shard(b) for b in data]
        st.calibrate(m, data, bias_correction=(a_init == "minmax"), rounding="nearest")
        out[a_init] = {n: [float(aq.scale.detach().reshape(-1)[0]), float(aq.offset.detach().reshape(-1)[0]) if aq.offset is not None else 0.0]
                       for n, _, _, aq in st.quantized_layers(m)}
        if a_init == "minmax":
            out["bias"] = {n: mm.bias.tolist() for n, mm, _, _ in st.quantized_layers(m)}
    return out


def job_disagree(rank, world, tmp):
    plan = {"0": {"w_bits": 2 + 2 * rank}}
    try:
        st.quantize_(net(), st.LSQ(), plan=plan)
    except st.ConfigError as e:
        return {"raised": str(e)}
    return {"raised": None}


def job_ebs(rank, world, tmp):
    r = st.ebs_search(net(), batches(), st.EBSConfig(steps=6, warmup=1, target_uniform=4, calib_batches=1),
                      progress=False)
    return {"plan": r.plan, "value": r.value}


def job_bn(rank, world, tmp):
    """reestimate_bn_: 2 ranks with 3 half-batches each == one process over all 6 half-batches."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=8, a_init="minmax"))
    g = torch.Generator().manual_seed(3)
    halves = [torch.randn(8, 1, 8, 8, generator=g) * (1 + i) for i in range(6)]
    st.calibrate(m, halves, bias_correction=False)
    mine = halves if world == 1 else halves[rank::world]
    st.reestimate_bn_(m, mine)
    bn = m[1]
    return {"mean": bn.running_mean.tolist(), "var": bn.running_var.tolist(), "n": int(bn.num_batches_tracked)}


def job_adaround(rank, world, tmp):
    """adaround_ under 2 ranks: rank 0 learns on its data, every rank ends with rank 0's result."""
    m = st.quantize_(net(), st.LSQ(w_bits=3, a_bits=8, a_init="minmax"))
    data = [b[0] for b in batches(2, 16, seed=11 + rank)]
    with D.local():                   # each rank calibrates on its own data: the ranks now differ
        st.calibrate(m, data, rounding="nearest")
    r = st.adaround_(m, data, iters=20, batch=8)
    return {"state": _state(m), "layers": sorted(r.layers)}


def job_gptq(rank, world, tmp):
    """gptq_ under 2 ranks: rank 0 rounds on its data, every rank ends with rank 0's result."""
    m = st.quantize_(net(), st.LSQ(w_bits=3, a_bits=8, a_init="minmax"))
    data = [b[0] for b in batches(2, 16, seed=11 + rank)]
    with D.local():
        st.calibrate(m, data, rounding="nearest")
    r = st.gptq_(m, data)
    return {"state": _state(m), "layers": sorted(r.layers)}


def job_gptq_bias(rank, world, tmp):
    """calibrate under 2 ranks with a bias-free 8-bit layer before a 4-bit one: rank 0 rounds the
    4-bit layer and bias-corrects the 8-bit one (adding a bias); every rank must end with it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 16, bias=False), nn.ReLU(), nn.Linear(16, 4))
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=8, a_init="minmax"), plan={"0": 8})
    st.calibrate(m, [D.shard(b[0]) for b in batches(2, 16, seed=5)])
    return {"state": _state(m), "bias0": m[0].bias is not None}


def job_model_input(rank, world, tmp):
    """Per-channel ranges of a conv reading the model input: each rank sees half of every batch."""
    out = {}
    for a_init in ("minmax", "mse_hist"):
        torch.manual_seed(0)
        m = st.quantize_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)),
                         st.LSQPlus(w_bits=8, a_bits=8, a_init=a_init))
        g = torch.Generator().manual_seed(9)
        data = [torch.randn(8, 3, 6, 6, generator=g) * torch.tensor([0.5, 1.0, 3.0]).view(1, 3, 1, 1)
                for _ in range(3)]
        st.calibrate(m, [D.shard(b) for b in data] if world > 1 else data, bias_correction=False)
        aq = m[0].input_quantizer
        out[a_init] = aq.scale.detach().flatten().tolist() + aq.offset.detach().flatten().tolist()
    return out


JOBS = {"model_input": job_model_input, "adaround": job_adaround, "gptq": job_gptq, "gptq_bias": job_gptq_bias, "bn": job_bn, "train": job_train, "calibrate": job_calibrate, "disagree": job_disagree, "ebs": job_ebs}
