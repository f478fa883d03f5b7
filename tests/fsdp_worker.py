"""FSDP over gloo with 2 CPU processes, run by tests/test_fsdp.py (Lightning launches the second rank itself).

    python tests/fsdp_worker.py OUT_DIR

Fit A: 2 epochs of 3 steps under FSDPStrategy (every layer its own FSDP unit, activation checkpointing on the
linear ones, full state dicts, the module channels_last): 2:4 pruning at step 1, INT8 QAT
(entropy calibration) at step 2, a checkpoint at every epoch end, TensorRTExport at fit end. Fit B: resumed from
A's epoch-0 checkpoint to the same end. Fits C and D: the same with sparsity only, the whole module one FSDP unit
and sharded state dicts. Fit E: an unsupported setting (TensorRTExport with sharded state dicts) must stop before
step 0. Each rank writes ``rank{r}.pt`` with
what it holds (masks, amax, its shard of the weights, the full weights after each fit); rank 0 also exports
``model.ckpt`` in this single process (``export_single/``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qatsparse import QuantizationAwareTraining, TensorRTExport, TwoFourSparsity
from qatsparse.quantization import quantizers
from qatsparse.sharding import CPUFSDPStrategy, clean_name, full_weights
from qatsparse.sparsity import sparsity_metrics
from qatsparse.sparsity.summary import sparsity_metrics_over_ranks


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        self.example_input_array = torch.zeros(1, 16, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(F.relu(self.conv(x)).mean((2, 3)))))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 16, 4, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4), DataLoader(TensorDataset(x[:8], y[:8]), batch_size=4)


class Dump(pl.Callback):
    """At fit end (before the export callback gathers anything): what this rank holds."""

    def __init__(self) -> None:
        self.state: dict = {}

    def on_fit_end(self, trainer, pl_module) -> None:
        sparsity = next(cb for cb in trainer.callbacks if isinstance(cb, TwoFourSparsity))
        self.state["masks"] = sparsity.masks.state_dict()["masks"]
        self.state["amax"] = {clean_name(n): q.amax.detach().clone() for n, q in quantizers(pl_module).items()}
        self.state["shards"] = {clean_name(n): p.detach().clone() for n, p in pl_module.named_parameters()}
        kinds = {type(m).__name__ for m in pl_module.modules()}
        self.state["wrappers"] = sorted(kinds & {"FullyShardedDataParallel", "CheckpointWrapper"})
        # the epoch-end sparsity metrics: counted on each rank's shards and summed, and on the gathered weights
        self.state["metrics_sharded"] = sparsity_metrics_over_ranks(trainer, pl_module, sparsity.pruned_layers)
        with full_weights(trainer):
            self.state["full"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            self.state["metrics_full"] = sparsity_metrics(pl_module, sparsity.pruned_layers)


#: Fits A and B: every conv and linear layer its own FSDP unit, the linear ones with activation checkpointing.
WRAPPED = {"auto_wrap_policy": {nn.Conv2d, nn.Linear}, "activation_checkpointing_policy": {nn.Linear}}


def fit(out: Path, name: str, epochs: int, qat: bool, sharded: bool = False, ckpt: Path | None = None) -> dict:
    pl.seed_everything(0)
    dump = Dump()
    callbacks: list = [TwoFourSparsity(start_step=1, exclude=["head"], verbose=False)]
    if qat:
        qat_cb = QuantizationAwareTraining(calibrator="entropy", calib_batches=2, start_step=2, exclude=["head"],
                                           verbose=False)  # fmt: skip
        callbacks.append(qat_cb)
    callbacks += [dump, pl.callbacks.ModelCheckpoint(out / name, filename="{epoch}", save_top_k=-1)]
    if qat:
        callbacks.append(TensorRTExport(out / f"export_{name}", build_engine=False, max_metric_drop=1.0, lint=False,
                                        batch_sizes=(1, 4, 8)))  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=CPUFSDPStrategy(state_dict_type="sharded") if sharded else CPUFSDPStrategy(**WRAPPED),
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    train, val = loaders()
    net = Net()
    if not sharded:  # a channels_last conv: FSDP restores its momentum scrambled unless made contiguous first
        net = net.to(memory_format=torch.channels_last)
    trainer.fit(net, train, val, ckpt_path=ckpt)
    assert trainer.global_step == 3 * epochs
    return dump.state


class BNNet(Net):
    """Net with a BatchNorm: FSDP mixed precision keeps its running statistics in FP16."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))))


def mixed_precision() -> dict:
    """Fit F: 2:4 + QAT with precision="16-mixed" and the whole module one FSDP unit (its buffers in FP16, the full
    weights FP32 inside summon_full_params): the preflight and calibration forwards must run."""
    pl.seed_everything(0)
    sparsity = TwoFourSparsity(start_step=1, exclude=["head"], verbose=False)
    qat = QuantizationAwareTraining(calib_batches=2, start_step=2, exclude=["head"], verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=CPUFSDPStrategy(), precision="16-mixed", max_steps=4, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[sparsity, qat],
    )  # fmt: skip
    trainer.fit(BNNet(), loaders()[0])
    amax = {clean_name(n): q.amax.detach().clone() for n, q in quantizers(trainer.lightning_module).items()}
    return {"steps": trainer.global_step, "amax": amax, "bn_dtype": str(trainer.lightning_module.bn.running_mean.dtype)}


def unsupported() -> dict:
    """The export with sharded state dicts (model.ckpt must be one file): the preflight stops before step 0."""
    steps = []

    class Steps(pl.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            steps.append(trainer.global_step)

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=CPUFSDPStrategy(state_dict_type="sharded"),
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TwoFourSparsity(verbose=False), TensorRTExport("unused", build_engine=False), Steps()],
    )
    try:
        trainer.fit(Net(), *loaders())
    except ValueError as e:
        return {"error": str(e), "steps": steps}
    return {"error": None, "steps": steps}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    result = {"A": fit(out, "A", 2, qat=True)}
    result["B"] = fit(out, "B", 2, qat=True, ckpt=out / "A" / "epoch=0.ckpt")
    result["C"] = fit(out, "C", 2, qat=False, sharded=True)
    result["D"] = fit(out, "D", 2, qat=False, sharded=True, ckpt=out / "C" / "epoch=0.ckpt")
    result["E"] = unsupported()
    result["F"] = mixed_precision()
    rank = torch.distributed.get_rank()
    torch.save(result, out / f"rank{rank}.pt")
    if rank == 0:  # the same weights exported by one process, from the checkpoint fit A's export wrote
        torch.distributed.destroy_process_group()
        exporter = TensorRTExport(out / "export_single", build_engine=False, max_metric_drop=1.0, lint=False,
                                  batch_sizes=(1, 4, 8))  # fmt: skip
        exporter.export_checkpoint(Net, out / "export_A" / "model.ckpt", loaders()[1])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
