"""The cubic sparsity schedule of movement pruning (Sanh, Wolf & Rush 2020, after Zhu & Gupta 2017),
exactly as the reference code's ``schedule_threshold`` (examples/research_projects/movement-pruning/
masked_run_glue.py, papers.md Sec. 5a):

    t <= iw * w                 : v_t = v_i                                 (initial warm-up)
    t >  T - fw * w             : v_t = v_f                                 (final warm-up)
    otherwise                   : v_t = v_f + (v_i - v_f) * (1 - (t - iw w) / (T - (iw + fw) w))^3
    lambda_t = lambda_f * v_t / v_f                                         (soft movement's L1 weight)

t = optimizer steps taken so far (0 before the first), T = total steps, w = ``warmup_steps``,
iw / fw = ``initial_warmup`` / ``final_warmup`` (in units of w). For top-k methods v is the fraction
of weights kept (1 -> remaining); for soft movement v is the threshold tau on sigmoid(S) (0 -> tau).
Steps past T are held at T (the reference never goes past T; the cubic would overshoot)."""
from __future__ import annotations


def cubic_value(step: int, total_steps: int, initial: float, final: float, warmup_steps: int = 0,
                initial_warmup: float = 1.0, final_warmup: float = 2.0) -> float:
    """v_t of the reference ``schedule_threshold`` (see the module docstring). ``total_steps`` 0:
    one shot, v = ``final`` from the start."""
    if total_steps <= 0:
        return float(final)
    step = min(int(step), int(total_steps))
    if step <= initial_warmup * warmup_steps:
        return float(initial)
    if step > total_steps - final_warmup * warmup_steps:
        return float(final)
    spars_warmup_steps = initial_warmup * warmup_steps
    spars_schedu_steps = (final_warmup + initial_warmup) * warmup_steps
    mul_coeff = 1 - (step - spars_warmup_steps) / (total_steps - spars_schedu_steps)
    return float(final + (initial - final) * (mul_coeff ** 3))


def regularization_lambda(value: float, final_value: float, final_lambda: float) -> float:
    """lambda_t = lambda_final * v_t / v_final (the reference's ``regu_lambda``)."""
    return float(final_lambda) * float(value) / float(final_value)


__all__ = ["cubic_value", "regularization_lambda"]
