"""benchmarks/pq_ipq.py's verdicts on made-up results: the goal line says met / NOT met honestly, the
tables and the per-point verdicts name the variant with the smallest drop."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import pq_ipq as B  # noqa: E402


def _res(acc: dict, ratios=(23.9, 30.2, 47.1)) -> dict:
    """acc: variant -> per-point accuracies (two seeds, equal); FP32 99.0 for every variant."""
    return {"float": {v: [99.0, 99.0] for v in B.VARIANTS},
            "ipq": {f"{v}|{j}": [a, a] for v, accs in acc.items() for j, a in enumerate(accs)},
            "sizes": {j: {"cost": 1000, "file": 1100, "ratio": r, "file_ratio": r * 0.9, "fp32": 212008}
                      for j, r in enumerate(ratios)}}


def _acc(best="QN p=0.1", best_acc=98.5):
    out = {v: [97.0, 96.0, 90.0] for v in B.VARIANTS}
    out[best] = [best_acc, 97.5, 93.0]
    return out


def test_goal_met_and_not_met():
    res = _res(_acc())
    lines, drops = B.tables("mnist", res)
    assert drops[("QN p=0.1", 0)] == 0.5 and any("| QN p=0.1 | 99.00 ± 0.00 | 98.50 ± 0.00 (+0.50)" in ln for ln in lines)
    assert B.goal(res, drops).startswith("**met**: QN p=0.1 at x23.9 (file x21.5), drop +0.50")
    res = _res(_acc(best_acc=97.9))
    _, drops = B.tables("mnist", res)
    assert B.goal(res, drops).startswith("**NOT met**: the best at >= x20 is QN p=0.1 at x23.9")
    res = _res(_acc(), ratios=(12.0, 15.0, 18.0))
    _, drops = B.tables("mnist", res)
    assert B.goal(res, drops) == "**NOT met**: no operating point reaches x20"


def test_verdicts_name_the_smallest_drop():
    res = _res(_acc(best="none"))
    _, drops = B.tables("mnist", res)
    v = B.verdicts("mnist", res, drops)
    assert v[0].startswith("at x23.9 the smallest drop is none (+0.50 pt)") and v[0].endswith("not smallest")
