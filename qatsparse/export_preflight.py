"""The export's preflight: what ``TensorRTExport`` will do at fit end, tried before step 0 -- TensorRT available
when the engine build is required, and the export and the accuracy gate on the first validation batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qatsparse.batches import as_outputs, describe, inputs_to
from qatsparse.fit_data import FitData
from qatsparse.forward_check import check_forward, run_forward


def check_engine_available(build_engine: Any) -> None:
    """``build_engine=True`` needs TensorRT and a CUDA device here."""
    if build_engine is True:
        from qatsparse.export.tensorrt import tensorrt_available

        if not tensorrt_available():
            raise RuntimeError(
                "TensorRTExport(build_engine=True): `import tensorrt` fails or there is no CUDA device; use "
                "build_engine='auto' to build the engine only where it can run (or False to never build it)"
            )


#: The largest ONNX file qatsparse writes: one protobuf message (weights included) cannot exceed 2 GiB.
ONNX_FILE_LIMIT = 2**31 - 1
#: What the graph itself (nodes, names, metadata) may take beside the weights.
_GRAPH_MARGIN = 2**26


def check_onnx_size(module: Any) -> None:
    """The FP32 ONNX graph fits in one file: ``model_fp32.onnx`` holds every weight in FP32, and qatsparse writes
    each ONNX file as one protobuf message, whose size protobuf caps at 2 GiB. Without this check a larger model
    would train and then fail at the export ("Failed to serialize proto", measured on a 2.0 GiB model).

    Example:
        >>> from torch import nn
        >>> check_onnx_size(nn.Linear(16, 4))  # a few hundred bytes: fine
    """
    import itertools

    n = sum(t.numel() for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point())
    if 4 * n > ONNX_FILE_LIMIT - _GRAPH_MARGIN:
        raise ValueError(
            f"TensorRTExport: the model's weights take {4 * n / 2**30:.2f} GiB in FP32, and qatsparse writes each "
            "ONNX file (model_fp32.onnx holds every weight in FP32) as one protobuf message, which cannot exceed "
            "2 GiB: models this large cannot be exported yet (ONNX external data is not supported). Leave "
            "TensorRTExport out: TwoFourSparsity and QuantizationAwareTraining still train the model, and the "
            "checkpoint keeps the masks and quantizers"
        )


def _names(given: Sequence[str] | None, keys: list[str] | None, n: int, stem: str) -> list[str]:
    from qatsparse.export.onnx import default_io_names

    return list(given or keys or default_io_names(n, stem))


def check_validation(data: FitData, settings: Any, on_fail: str) -> list[str]:
    """What the export and the accuracy gate will do at fit end, tried on the first validation batch: the
    validation loader exists, the model takes its inputs (and ``example_input_array``), the ONNX input and
    output names fit, every metric can be computed, and ``max_metric_drop`` names only computed metrics.

    Returns warnings (gate problems when ``on_fail="warn"``, which would only warn at fit end too).
    """
    from qatsparse.batches import batch_targets, input_names, input_tensors
    from qatsparse.metrics import BackendMetrics, metric_specs

    if data.val_loader() is None:
        raise ValueError(
            "TensorRTExport needs validation data and this fit has none: pass it to "
            "`trainer.fit(model, train_dataloaders, val_dataloaders)`, or use a LightningDataModule or "
            "LightningModule with a `val_dataloader()` (the validation loop itself may be off)"
        )
    from qatsparse.export.pooling import adaptive_pool_problems

    module = data.module
    batch = data.val_batch()
    with adaptive_pool_problems(module) as pooling:
        inputs, out = check_forward(module, batch, "TensorRTExport (validation batches)")
    source = "the first validation batch"
    example = getattr(module, "example_input_array", None)
    if example is not None:
        where = f"TensorRTExport (the export example, {type(module).__name__}.example_input_array)"
        from qatsparse.batches import example_inputs

        try:
            ex_inputs = example_inputs(module)
        except TypeError as e:
            raise TypeError(f"{where}: {e}") from None
        with adaptive_pool_problems(module) as pooling:
            ex_out = run_forward(module, inputs_to(ex_inputs, data.device), where)
        if len(as_outputs(ex_out)) != len(as_outputs(out)):
            raise ValueError(
                f"{where}: gives {len(as_outputs(ex_out))} outputs, a validation batch {len(as_outputs(out))}"
            )
        inputs, source = ex_inputs, f"{type(module).__name__}.example_input_array"
    if pooling:
        raise ValueError(
            f"TensorRTExport: the model cannot be exported to ONNX at the size of its export input ({source}, "
            f"{describe(inputs)}): {'; '.join(pooling)}. Export (and validate) at a size that gives such a multiple "
            "-- torchvision VGG and AlexNet need 224x224 images -- or pool with a fixed kernel"
        )
    outs = as_outputs(out)
    keys = input_names(inputs)
    n_in = len(input_tensors(inputs))
    given = settings.input_names
    if given and (len(given) != n_in or (keys is not None and list(given) != keys)):
        want = f"the keywords {keys}" if keys is not None else f"{n_in} name(s)"
        raise ValueError(
            f"TensorRTExport(input_names={given!r}): the model takes {describe(inputs)}, so give {want} or leave "
            "input_names unset"
        )
    if settings.output_names and len(settings.output_names) != len(outs):
        raise ValueError(
            f"TensorRTExport(output_names={settings.output_names!r}): the model returns {len(outs)} output(s) "
            f"({describe(out)}); give {len(outs)} name(s)"
        )
    outputs = _names(
        settings.output_names, [str(k) for k in out] if isinstance(out, Mapping) else None, len(outs), "output"
    )
    specs = metric_specs(settings.metrics, outputs)
    targets = batch_targets(module, batch)
    computed: list[str] = []
    if targets is not None:
        metrics = BackendMetrics(specs)
        try:
            metrics.update([o.detach().float().cpu() for o in outs], [t.cpu() for t in targets], outputs)
            computed = list(metrics.compute())
        except Exception as e:
            raise ValueError(
                f"TensorRTExport(metrics={settings.metrics!r}): computing the metrics on the first validation batch "
                f"(outputs {describe(out)}, targets {describe(targets)}) fails: {type(e).__name__}: {e}"
            ) from e
    gate: list[str] = []
    if not computed:
        gate.append(
            f"TensorRTExport: no metric can be computed on the validation batches ({describe(batch)}: "
            f"{'no target' if targets is None else 'no default metric fits outputs ' + describe(out)}), so the "
            "accuracy gate would check nothing; give targets (the second element of a tuple batch, a 'labels' "
            "entry, or `batch_targets(batch)`) and/or `metrics=...`"
        )
    bounds = settings.max_metric_drop
    unknown = [m for m in bounds if m not in computed] if isinstance(bounds, Mapping) else []
    if unknown and computed:
        gate.append(
            f"TensorRTExport(max_metric_drop={dict(bounds)!r}): {unknown} will not be computed; the metrics are "
            f"{computed} (rename the bounds, or add metrics with `metrics=...`)"
        )
    if gate and on_fail == "raise":
        raise ValueError("\n     ".join(gate))
    return gate
