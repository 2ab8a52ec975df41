"""Searches and costs: budgets (bytes, BitOps), Hessian traces, bit allocation."""
