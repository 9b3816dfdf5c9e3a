"""``load_loader_state``: restore a ``StatefulDataLoader`` so that its sampler is up to date at
once, not only when the next iterator is made."""

from __future__ import annotations

from typing import Any


def load_loader_state(loader: Any, state: dict[str, Any]) -> None:
    """``loader.load_state_dict(state)``, and the sampler's part of ``state`` loaded into
    ``loader.batch_sampler`` now.

    torchdata's ``StatefulDataLoader`` keeps a loaded state until its next iterator is made, so
    until then ``sampler.epoch`` and ``len(loader)`` still describe the fresh sampler. After this
    call they say where the run stands (the epoch to resume, the batches left in it), and the
    loader's own restore, when the iterator is made, loads the same position again.
    """
    loader.load_state_dict(state)
    sampler = getattr(loader, "batch_sampler", None)
    found = find_sampler_state(state)
    if found is not None and hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(found)


def find_sampler_state(tree: Any) -> dict[str, Any] | None:
    """The first sampler state (a dict with ``fingerprint`` and ``consumed``) in ``tree``."""
    if not isinstance(tree, dict):
        return None
    if "fingerprint" in tree and "consumed" in tree:
        return tree
    for value in tree.values():
        found = find_sampler_state(value)
        if found is not None:
            return found
    return None
