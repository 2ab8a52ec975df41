"""The cubic schedule reproduces the reference ``schedule_threshold`` (movement-pruning
masked_run_glue.py, papers.md Sec. 5a): endpoints, warm-ups, lambda following the threshold."""
import pytest

from slimtorch.prune import cubic_value, regularization_lambda


def reference_schedule_threshold(step, total_step, warmup_steps, initial_threshold, final_threshold,
                                 initial_warmup, final_warmup, final_lambda):
    """Copied from the reference code (huggingface/transformers examples/research_projects/
    movement-pruning/masked_run_glue.py)."""
    if step <= initial_warmup * warmup_steps:
        threshold = initial_threshold
    elif step > (total_step - final_warmup * warmup_steps):
        threshold = final_threshold
    else:
        spars_warmup_steps = initial_warmup * warmup_steps
        spars_schedu_steps = (final_warmup + initial_warmup) * warmup_steps
        mul_coeff = 1 - (step - spars_warmup_steps) / (total_step - spars_schedu_steps)
        threshold = final_threshold + (initial_threshold - final_threshold) * (mul_coeff**3)
    regu_lambda = final_lambda * threshold / final_threshold
    return threshold, regu_lambda


@pytest.mark.parametrize("T, w, iw, fw, vi, vf, lam", [
    (1000, 54, 1, 2, 1.0, 0.15, 0.0),       # hard movement, the README's units scaled down
    (1000, 54, 1, 2, 0.0, 0.1, 400.0),      # soft movement: tau 0 -> 0.1, lambda 400
    (300, 0, 1, 2, 1.0, 0.03, 0.0),         # no warm-up
    (120, 10, 0.5, 3, 1.0, 0.1, 0.0),       # fractional warm-up units
    (90, 30, 1, 2, 1.0, 0.1, 0.0),          # warm-ups fill the run: a step from initial to final
])
def test_matches_reference_at_every_step(T, w, iw, fw, vi, vf, lam):
    for t in range(T + 1):
        ref, ref_lam = reference_schedule_threshold(t, T, w, vi, vf, iw, fw, lam)
        got = cubic_value(t, T, vi, vf, w, iw, fw)
        assert got == pytest.approx(ref, abs=1e-12), t
        assert regularization_lambda(got, vf, lam) == pytest.approx(ref_lam, abs=1e-9)


def test_endpoints_and_warmups():
    T, w = 1000, 50
    assert cubic_value(0, T, 1.0, 0.1, w) == 1.0
    assert cubic_value(w, T, 1.0, 0.1, w) == 1.0                   # held through the initial warm-up
    assert cubic_value(w + 1, T, 1.0, 0.1, w) < 1.0                # then decreasing
    assert cubic_value(T - 2 * w, T, 1.0, 0.1, w) == pytest.approx(0.1)   # the cubic reaches the end ...
    assert cubic_value(T - 2 * w + 1, T, 1.0, 0.1, w) == 0.1       # ... then the final warm-up holds it
    assert cubic_value(T, T, 1.0, 0.1, w) == 0.1
    assert cubic_value(T + 500, T, 1.0, 0.1, w) == 0.1             # past the run: held (no overshoot)
    vals = [cubic_value(t, T, 1.0, 0.1, w) for t in range(T + 1)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))             # monotone
    assert cubic_value(0, 0, 1.0, 0.1) == 0.1                      # one shot


def test_soft_lambda_follows_tau():
    T, w = 200, 10
    assert regularization_lambda(cubic_value(0, T, 0.0, 0.1, w), 0.1, 400) == 0.0
    assert regularization_lambda(cubic_value(T, T, 0.0, 0.1, w), 0.1, 400) == pytest.approx(400)
