"""Reading the Trainer's data from outside its loops: the validation loader before the validation loop ran,
and batches of the training loader without disturbing the training pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from qatsparse.lightning_compat import overrides


def first_loader(loaders: Any) -> Any:
    """The first loader of what a ``*_dataloader`` hook may return (a loader, a list/tuple or a dict of them)."""
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def find_val_dataloader(trainer: Any) -> Any | None:
    """The validation loader of a ``fit`` -- available from ``on_fit_start`` on, whether or not the validation
    loop runs (``num_sanity_val_steps=0``, ``limit_val_batches=0``, a ``max_steps`` shorter than an epoch).

    Looks, in order, at the datamodule's ``val_dataloader()``, the loaders given to ``fit(...)`` or the
    LightningModule's ``val_dataloader()``, then the loaders the Trainer has already loaded. The first two
    are read unsharded (without the DistributedSampler Lightning adds), so rank 0 validates the whole set.
    Returns None when there is no validation data at all.
    """
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and overrides(dm, "val_dataloader"):
        return first_loader(dm.val_dataloader())
    # Lightning keeps what `fit(model, train, val)` was given in a private source object (the fit loop's
    # validation loop's `_data_source` in Lightning 2.x) and has no public accessor before that loop loaded it.
    val_loop = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "val_loop", None)
    source = getattr(val_loop, "_data_source", None)
    if source is not None and hasattr(source, "is_defined") and source.is_defined():
        return first_loader(source.dataloader())
    return first_loader(getattr(trainer, "val_dataloaders", None))


def train_dataloader(trainer: Any) -> Any:
    """The Trainer's training loader (loaded now if the fit loop has not loaded it yet)."""
    loader = trainer.train_dataloader
    if loader is None:
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
    return first_loader(loader)


def separate_pass(loader: Any) -> Any:
    """A loader whose iteration does not disturb the training loop's pass over ``loader``.

    With ``persistent_workers=True`` PyTorch hands every ``iter(loader)`` the same worker iterator and
    resets it, so reading mid-epoch would replay the epoch's batches. Such loaders are read through a
    single-process twin with the same dataset, batch sampler (DDP sharding included) and collate_fn.
    """
    if isinstance(loader, DataLoader) and loader.persistent_workers and loader.num_workers > 0:
        if loader.batch_sampler is not None:
            return DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn)
        return DataLoader(loader.dataset, batch_size=None, collate_fn=loader.collate_fn)
    return loader


def _generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator``s a loader draws from when iterated: its own (worker seeds) and its samplers'."""
    owners = [loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)]
    owners.append(getattr(owners[2], "sampler", None))
    found: dict[int, torch.Generator] = {}
    for o in owners:
        g = getattr(o, "generator", None)
        if isinstance(g, torch.Generator):
            found[id(g)] = g
    return list(found.values())


@contextlib.contextmanager
def sampler_state_kept(loader: Any) -> Iterator[None]:
    """Iterate ``loader`` inside this block and its samplers' generators end where they were, so the
    training pass draws the same order as without the extra reading (a seeded ``shuffle=True`` loader
    would otherwise shift by one permutation). The global RNG is the caller's to fork."""
    states = [(g, g.get_state()) for g in _generators(loader)]
    try:
        yield
    finally:
        for g, s in states:
            g.set_state(s)


def peek(loader: Any) -> Any:
    """The first batch of a fresh pass over ``loader``, read without disturbing the training pass (see
    :func:`separate_pass`, :func:`sampler_state_kept`; fork the global RNG around the call).

    Raises:
        ValueError: the loader yields no batch.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> dl = DataLoader(list(range(8)), batch_size=4, shuffle=True, generator=g)
        >>> first = peek(dl); torch.equal(first, next(iter(dl)))
        True
    """
    with sampler_state_kept(loader):
        batch = next(iter(separate_pass(loader)), None)
    if batch is None:
        raise ValueError("the dataloader yields no batch")
    return batch
