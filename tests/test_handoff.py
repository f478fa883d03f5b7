"""The TensorRT hand-off bundle: a real batch that round-trips through ONNX Runtime, commands that use only flags the
targeted trtexec/Polygraphy releases document, build.sh's version switch, check.sh's comparison run for real."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess

import numpy as np
import pytest
import torch

from qatsparse.export.handoff import (
    TENSORRT_RANGE,
    TOOL_FLAGS_PATH,
    Tolerance,
    command_lines,
    polygraphy_check_args,
    tool_flags,
    trtexec_flags,
    undocumented_flags,
)
from qatsparse.export.runners import OnnxRuntimeRunner
from qatsparse.pipeline import ExportSettings, export_and_validate, onnx_io_names
from qatsparse.quantization import QuantConfig, calibrate, quantize_model
from qatsparse.sparsity import prune_2to4
from tests.test_export_nets import board_loader, trained_board_net


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A pruned INT8 two-input/two-output model exported with its bundle: (folder, report, loader)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("handoff")
    reference = trained_board_net(steps=6)
    final = copy.deepcopy(reference)
    masks = prune_2to4(final)
    quantize_model(final, QuantConfig(precision="int8"))
    loader = board_loader(64, 32)
    calibrate(final, loader, lambda b: final(*b[0]))
    settings = ExportSettings(dirpath=d, output_names=["policy", "value"], max_metric_drop=1.0, batch_sizes=(1, 8, 16))
    report = export_and_validate(final, reference, loader, settings, pruned_layers=list(masks.masks), console=False)
    torch.set_num_threads(n)
    return d / "tensorrt", report, loader


def test_bundle_holds_a_real_batch_whose_saved_outputs_onnxruntime_reproduces(bundle):
    folder, report, loader = bundle
    names = {p.name for p in folder.iterdir()}
    assert {"build.sh", "check.sh", "inputs.npz", "outputs_pytorch_qat.npz", "outputs_onnxruntime.npz",
            "onnxruntime_outputs.json", "load_inputs.py", "README.md"} <= names  # fmt: skip
    assert report["tensorrt_bundle"]["folder"] == str(folder)
    in_names, out_names = onnx_io_names(folder.parent / "model.onnx")
    (planes, side), _ = next(iter(loader))
    with np.load(folder / "inputs.npz") as inputs:
        assert list(inputs.files) == in_names
        np.testing.assert_array_equal(inputs[in_names[0]], planes[:16].numpy())  # the first validation batch,
        np.testing.assert_array_equal(inputs[in_names[1]], side[:16].numpy())  # cut to the profile's max batch
        feed = tuple(torch.from_numpy(inputs[n]) for n in in_names)
    again = OnnxRuntimeRunner(folder.parent / "model.onnx")(feed)
    with np.load(folder / "outputs_onnxruntime.npz") as ort, np.load(folder / "outputs_pytorch_qat.npz") as qat:
        assert list(ort.files) == list(qat.files) == out_names
        for name, out in zip(out_names, again):
            np.testing.assert_array_equal(out.numpy(), ort[name])
            tol = report["tensorrt_bundle"]["tolerances"][name]
            assert np.abs(ort[name] - qat[name]).max() == pytest.approx(tol["max_abs_err"])


def test_build_sh_uses_only_documented_trtexec_flags_and_the_profile(bundle):
    folder, report, _ = bundle
    (args,) = command_lines((folder / "build.sh").read_text(), '"$TRTEXEC"')
    assert args[0] == "$typing"  # --stronglyTyped on 10.x, nothing on 11.x (the script decides)
    releases = trtexec_flags()
    assert min(releases) == "10.0.0" and "11.1" in releases and len(releases) >= 20
    for release, documented in releases.items():
        assert undocumented_flags([*args[1:], "--stronglyTyped"], documented) == [], release
    flags = dict(a.split("=", 1) for a in args[1:])
    assert flags["--onnx"] == "../model.onnx" and flags["--saveEngine"] == "model.plan"
    assert flags["--sparsity"] == "enable"  # layers were pruned
    assert flags["--profilingVerbosity"] == "detailed" and flags["--exportLayerInfo"] == "layer_info.json"
    assert flags["--timingCacheFile"] == "timing.cache" and flags["--memPoolSize"] == "workspace:4096"
    assert flags["--minShapes"] == "input_0:1x6x8x8,input_1:1x5"
    assert flags["--optShapes"] == "input_0:8x6x8x8,input_1:8x5"
    assert flags["--maxShapes"] == "input_0:16x6x8x8,input_1:16x5"
    assert report["tensorrt_bundle"]["profile"]["input_1"] == [[1, 5], [8, 5], [16, 5]]


def _fake_trtexec(tmp_path, version: int):
    """A stand-in for trtexec that prints the start line real trtexec prints and records its arguments: it runs
    build.sh's own logic (version switch, arguments), nothing of TensorRT."""
    exe = tmp_path / f"trtexec{version}"
    exe.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{version}] [b1] # trtexec $*"\n'
        f'if [ "$1" != "--help" ]; then printf "%s\\n" "$@" > "{tmp_path}/args{version}"; fi\n'
    )
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


@pytest.mark.parametrize(("version", "typed"), [(100000, True), (101601, True), (110100, False)])
def test_build_sh_is_strongly_typed_on_10x_and_leaves_the_deprecated_flag_out_on_11x(bundle, tmp_path, version, typed):
    folder, _, _ = bundle
    exe = _fake_trtexec(tmp_path, version)
    res = subprocess.run(["bash", str(folder / "build.sh")], env={**os.environ, "TRTEXEC": str(exe)},
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    args = (tmp_path / f"args{version}").read_text().split()
    assert ("--stronglyTyped" in args) is typed
    release = f"{version // 10000}.{version // 100 % 100}"
    documented = next(f for v, f in trtexec_flags().items() if v.startswith(release))
    assert undocumented_flags(args, documented) == []
    assert (folder / "build.log").is_file()


def test_build_sh_refuses_a_tensorrt_older_than_10(bundle, tmp_path):
    folder, _, _ = bundle
    res = subprocess.run(["bash", str(folder / "build.sh")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TRTEXEC": str(_fake_trtexec(tmp_path, 8601))})  # fmt: skip
    assert res.returncode == 1 and "needs TensorRT 10.0-11.1" in res.stderr
    assert not (tmp_path / "args8601").exists()


def test_check_sh_uses_only_documented_polygraphy_flags_and_its_parser_accepts_them(bundle):
    folder, report, _ = bundle
    (args,) = command_lines((folder / "check.sh").read_text(), '"$POLYGRAPHY"')
    assert args[:6] == ["run", "model.plan", "--model-type", "engine", "--trt", "--data-loader-script"]
    poly = tool_flags()["polygraphy_run"]
    assert poly["version"].startswith("0.53") and undocumented_flags(args, set(poly["flags"])) == []
    tol = report["tensorrt_bundle"]["tolerances"]
    assert f"policy:{tol['policy']['atol']:.6g}" in args and f"value:{tol['value']['cosine']:.6g}" in args
    import polygraphy

    if polygraphy.__version__.startswith("0.53"):  # the installed release parses the command as written
        import argparse

        from polygraphy.tools.registry import TOOL_REGISTRY

        parser = argparse.ArgumentParser(exit_on_error=False)
        next(t for t in TOOL_REGISTRY if t.name == "run").setup_parser(parser.add_subparsers())
        ns = parser.parse_args(args)
        assert ns.model_file == "model.plan" and ns.atol == [f"policy:{tol['policy']['atol']:.6g}",
                                                              f"value:{tol['value']['atol']:.6g}"]  # fmt: skip


def _polygraphy(args: list[str]) -> int:
    from polygraphy.tools import main

    return main(run_opts=args)


def test_check_sh_comparison_passes_on_a_second_implementation_and_fails_beyond_the_tolerance(
    bundle, monkeypatch, capfd
):
    """check.sh's comparison, with ONNX Runtime standing in for the engine (TensorRT is not here): against the PyTorch
    QAT outputs (another implementation of the same graph) it passes; against outputs moved by 3 x atol it fails."""
    from polygraphy.comparator import IterationResult, RunResults

    folder, report, _ = bundle
    monkeypatch.chdir(folder)
    tolerances = {n: Tolerance(**t) for n, t in report["tensorrt_bundle"]["tolerances"].items()}
    with np.load("outputs_pytorch_qat.npz") as qat:
        outputs = {n: qat[n] for n in qat.files}
    for name, shift in (("qat.json", 0.0), ("shifted.json", 3.0)):
        moved = {n: o + np.float32(shift * tolerances[n].atol) * (np.arange(o.size) == 0).reshape(o.shape)
                 for n, o in outputs.items()}  # fmt: skip
        results = RunResults()
        results.append(("pytorch_qat", [IterationResult(moved, runner_name="pytorch_qat")]))
        results.save(name)
    run = polygraphy_check_args("../model.onnx", ["--onnxrt"], tolerances, reference="qat.json")
    assert _polygraphy(run) == 0
    assert "PASSED | Output: 'policy'" in capfd.readouterr().out
    assert _polygraphy([a if a != "qat.json" else "shifted.json" for a in run]) != 0
    out = capfd.readouterr().out
    assert "FAILED | Output: 'policy' | Difference exceeds tolerance" in out and "Output: 'value'" in out


def test_flag_lists_name_their_sources():
    data = json.loads(TOOL_FLAGS_PATH.read_text())
    assert "sampleOptions.cpp" in data["trtexec"]["source"] and data["generated_by"] == "scripts/tool_flags.py"
    tags = [e["tag"] for e in data["trtexec"]["versions"].values()]
    assert tags[0] == "v10.0.0" and tags[-1] == "v" + TENSORRT_RANGE[1]
    assert "polygraphy run" in data["polygraphy_run"]["source"]
    assert "--fp16" not in trtexec_flags(11)["11.0"]  # 11.x removed the weak-typing flags build.sh never uses
