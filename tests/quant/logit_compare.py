"""Compare two sets of logits (e.g. onnxruntime vs PyTorch) without trusting argmax on ties."""
import numpy as np


def decided_argmax_agree(got, want, tol=None):
    """(all rows agree, rows checked): argmax of ``got`` and ``want`` compared only on rows whose
    top-2 margin in ``want`` exceeds 2 * ``tol`` (default: the observed max |got - want|), where
    no difference within ``tol`` can reorder the top two. Ties and near-ties are skipped."""
    got, want = np.asarray(got), np.asarray(want)
    tol = float(np.abs(got - want).max()) if tol is None else float(tol)
    top2 = np.sort(want, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * tol
    agree = got.argmax(1)[decided] == want.argmax(1)[decided]
    return bool(agree.all()), int(decided.sum())
