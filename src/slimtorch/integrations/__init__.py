"""Integrations with training frameworks, imported lazily: ``import slimtorch`` never needs them.

    from slimtorch.integrations import PruneCallback, PruneTrainer     # needs transformers

(``hf.py``: movement pruning, Sanh, Wolf & Rush 2020, in a ``transformers.Trainer``.)"""

_HF = ("PruneCallback", "PruneLossMixin", "PruneTrainer", "add_prune_penalty", "prune_optimizer")


def __getattr__(name):
    if name in _HF:
        from . import hf
        return getattr(hf, name)
    raise AttributeError(f"module 'slimtorch.integrations' has no attribute {name!r}")


__all__ = list(_HF)
