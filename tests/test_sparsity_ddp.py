"""DDP with 2 CPU processes (gloo): every rank ends with rank 0's channel permutation, masks and zero pattern."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qatsparse import TwoFourSparsity
from qatsparse.sparsity import MaskSet, check_2to4, compute_masks
from qatsparse.sparsity.permutation import Move, apply_channel_permutations, search_channel_permutations

START = 2


class _Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(F.relu(self.conv(x)).mean((2, 3)))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(32, 16, 4, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=4)


class _DivergeThenDump(pl.Callback):
    """Makes rank 1's weights differ just before pruning (as nondeterminism would); dumps each rank's state."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.local_masks: dict | None = None
        self.before: dict = {}
        self.after_prune: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == START and self.local_masks is None:
            if trainer.global_rank == 1:
                with torch.no_grad():
                    for p in pl_module.parameters():
                        p.add_(torch.randn_like(p))
            self.local_masks = compute_masks(pl_module).masks  # what this rank alone would prune
            self.before = {k: v.detach().clone().cpu() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module) -> None:
        sparsity = next(cb for cb in trainer.callbacks if isinstance(cb, TwoFourSparsity))
        torch.save(
            {
                "masks": sparsity.masks.state_dict()["masks"],
                "local": self.local_masks,
                "zeros": {n: (dict(pl_module.named_modules())[n].weight == 0).cpu() for n in sparsity.pruned_layers},
                "violations": check_2to4(pl_module),
                "pruned_at": sparsity.pruned_at_step,
                "before": self.before,
                "moves": [m.to_dict() for m in sparsity.applied_moves],
                "after_prune": self.after_prune,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


class _AfterPrune(pl.Callback):
    """Snapshot of the weights right after pruning (listed after TwoFourSparsity: same hook, later)."""

    def __init__(self, dump: _DivergeThenDump) -> None:
        self.dump = dump

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == START:
            self.dump.after_prune = {k: v.detach().clone().cpu() for k, v in pl_module.state_dict().items()}


def test_ddp_ranks_hold_identical_masks(tmp_path):
    sparsity = TwoFourSparsity(start_step=START, exclude=["head"], verbose=False, permute=True)
    dump = _DivergeThenDump(tmp_path)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[dump, sparsity, _AfterPrune(dump)],  # the divergence happens before pruning
    )
    trainer.fit(_Net())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["pruned_at"] == r1["pruned_at"] == START
    assert sorted(r0["masks"]) == sorted(r1["masks"]) == ["conv", "fc"]
    # rank 1 alone would have pruned differently; the broadcast made rank 0's masks authoritative ...
    assert any(not torch.equal(r0["local"][k], r1["local"][k]) for k in r0["local"])
    for k in r0["masks"]:
        assert torch.equal(r0["masks"][k], r1["masks"][k])
        # ... and both ranks hold exactly that zero pattern (not the union of two patterns)
        assert torch.equal(r0["zeros"][k], ~r0["masks"][k]) and torch.equal(r1["zeros"][k], ~r1["masks"][k])
    assert r0["violations"] == r1["violations"] == []
    # Channel permutation: rank 0 searched, both ranks applied its permutation to their own weights.
    assert r0["moves"] and r0["moves"] == r1["moves"]
    moves = [Move.from_dict(m) for m in r0["moves"]]
    for r in (r0, r1):
        net = _Net()
        net.load_state_dict(r["before"])
        apply_channel_permutations(net, moves)
        MaskSet.from_state_dict({"masks": r0["masks"], "skipped": {}}).apply(net)
        assert all(torch.equal(v, r["after_prune"][k]) for k, v in net.state_dict().items())
    net1 = _Net()
    net1.load_state_dict(r1["before"])
    own = search_channel_permutations(net1, (torch.zeros(2, 16, 4, 4),), ["conv", "fc"])
    assert [m.perm.tolist() for m in own.moves] != [m.perm.tolist() for m in moves]  # rank 1 alone would differ
