"""The qatsparse command: recipe names, version key, typo errors, export/validate of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import yaml

from qatsparse.cli import error_hints, list_recipes, main, recipe_paths, resolve_config, run_cli
from qatsparse.sparsity import check_2to4
from tests.test_recipes_helpers import load_recipe, shortened


def test_recipes_command_lists_every_shipped_recipe_with_its_description(capsys):
    main(["recipes"])
    out = capsys.readouterr().out
    for name, desc in list_recipes().items():
        assert f"{name}  " in out and desc in out
    assert "digits_int8_sparse" in out


def test_config_takes_a_recipe_name_or_a_path_and_names_the_recipes_otherwise(tmp_path):
    path = recipe_paths()["digits_fp16"]
    assert resolve_config("digits_fp16") == resolve_config("digits_fp16.yaml") == str(path)
    mine = tmp_path / "mine.yaml"
    mine.write_text("seed_everything: 1\n")
    assert resolve_config(str(mine)) == str(mine)
    with pytest.raises(SystemExit, match=r"'digits_int9'.*shipped recipes: .*digits_int8_sparse"):
        resolve_config("digits_int9")


def test_unsupported_recipe_version_fails_while_parsing(tmp_path, capsys):
    cfg = load_recipe("digits_int8_sparse")
    cfg["version"] = 99
    path = tmp_path / "v99.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(path)])
    assert exc.value.code == 2
    assert "recipe version 99 is not supported" in capsys.readouterr().err


def test_misspelt_callback_argument_fails_before_training_naming_it_and_the_valid_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text = recipe_paths()["digits_int8_sparse"].read_text().replace("start_step: 400", "start_stp: 400")
    (tmp_path / "typo.yaml").write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "typo.yaml"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "start_stp" in err
    assert "did you mean 'start_step'?" in err
    assert "valid keys: start_step, include, exclude, make_permanent, verbose" in err
    assert not (tmp_path / "runs").exists()  # nothing was built, let alone trained


def test_misspelt_model_and_trainer_keys_are_named_with_the_closest_valid_key(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", "digits_int8_sparse", "--model.init_args.widhts=[8,16]"])
    assert "did you mean 'widths'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--config", "digits_int8_sparse", "--trainer.max_stesp=3"])
    err = capsys.readouterr().err
    assert "max_stesp" in err and "did you mean 'max_steps'?" in err


def test_error_hints_reads_jsonargparse_messages():
    msg = "Problem with given class_path 'qatsparse.TensorRTExport':\n    Option 'dirpth' is not accepted"
    (hint,) = error_hints(msg)
    assert "did you mean 'dirpath'?" in hint and "max_metric_drop" in hint
    assert error_hints("Subcommand 'fit' does not accept option 'trainer.devics'", ["trainer.devices"]) == [
        "trainer: 'devics' is not a valid key (did you mean 'devices'?); valid keys: devices"
    ]


# ------------------------------------------------------------------------------- checkpoint commands
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A short digits INT8 + 2:4 run that keeps its final checkpoint: (config, checkpoint, fit report)."""
    tmp = tmp_path_factory.mktemp("digits")
    cfg_path = shortened(
        "digits_int8_sparse",
        tmp,
        40,
        15,
        30,
        model={"widths": [16, 32]},
        trainer={"enable_checkpointing": True},
    )
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["trainer"]["callbacks"].append(
        {
            "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp / "ckpt"), "filename": "final", "every_n_train_steps": 40},
        }
    )
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    main(["fit", "--config", str(cfg_path)])
    report = json.loads((tmp / "runs" / "digits_int8_sparse" / "report.json").read_text())
    return cfg_path, tmp / "ckpt" / "final.ckpt", report


def test_export_rebuilds_the_run_from_config_and_qat_checkpoint(digits_run, tmp_path):
    cfg, ckpt, fit_report = digits_run
    main(["export", "--config", str(cfg), "--ckpt_path", str(ckpt), "--dirpath", str(tmp_path / "exp")])
    report = json.loads((tmp_path / "exp" / "report.json").read_text())
    for backend in ("pytorch_fp32", "pytorch_qat", "onnxruntime"):  # same dense reference, same final model
        assert report["backends"][backend]["metrics"] == pytest.approx(fit_report["backends"][backend]["metrics"])
    assert report["sparsity"]["pruned_layers"] == fit_report["sparsity"]["pruned_layers"] != []
    assert report["quantization"]["precision"] == "int8"
    assert report["quantization"]["quantized"] == fit_report["quantization"]["quantized"]
    assert report["quantization"]["input_amax"] == pytest.approx(fit_report["quantization"]["input_amax"])
    assert check_2to4(tmp_path / "exp" / "model.onnx") == []
    ops = {n.op_type for n in onnx.load(str(tmp_path / "exp" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_export_needs_a_checkpoint(digits_run, capsys):
    cfg, _, _ = digits_run
    with pytest.raises(SystemExit):
        main(["export", "--config", str(cfg)])
    assert "ckpt_path" in capsys.readouterr().err


def test_validate_without_artifact_flags_is_lightning_validation_of_the_qat_checkpoint(digits_run):
    cfg, ckpt, fit_report = digits_run
    cli = run_cli(["validate", "--config", str(cfg), "--ckpt_path", str(ckpt)])
    val_acc = float(cli.trainer.callback_metrics["val_acc"])
    assert val_acc == pytest.approx(fit_report["backends"]["pytorch_qat"]["metrics"]["top1"], abs=1e-6)


def _has(module: str, name: str) -> bool:
    try:
        mod = __import__(module, fromlist=[name])
    except ImportError:
        return False
    return hasattr(mod, name)


needs_validate_artifacts = pytest.mark.skipif(
    not _has("qatsparse.pipeline", "validate_artifacts"), reason="needs qatsparse.benchmark/validate_artifacts"
)
needs_benchmark = pytest.mark.skipif(
    not (_has("qatsparse.benchmark", "benchmark") and _has("qatsparse.benchmark", "format_table")),
    reason="needs qatsparse.benchmark/validate_artifacts",
)


@needs_validate_artifacts
def test_validate_with_onnx_revalidates_the_exported_artifact(digits_run):
    cfg, ckpt, fit_report = digits_run
    out = Path(fit_report["artifacts"]["report.json"]).parent
    (out / "report.json").unlink()
    run_cli(["validate", "--config", str(cfg), "--ckpt_path", str(ckpt), "--onnx", str(out / "model.onnx")])
    report = json.loads((out / "report.json").read_text())  # rewritten by the artifact validation
    for backend in ("pytorch_fp32", "onnxruntime"):
        assert report["backends"][backend]["metrics"] == pytest.approx(fit_report["backends"][backend]["metrics"])
    assert report["sparsity"]["pruned_layers"] == fit_report["sparsity"]["pruned_layers"]


@needs_benchmark
def test_bench_times_the_backends(digits_run, tmp_path, capsys):
    cfg, ckpt, _ = digits_run
    out = tmp_path / "bench.json"
    main(["bench", "--config", str(cfg), "--ckpt_path", str(ckpt), "--batch_sizes", "[1, 8]", "--output", str(out)])
    assert out.is_file()
    assert json.loads(out.read_text())
    assert capsys.readouterr().out.strip()


# ------------------------------------------------------------------ on a TensorRT machine (skipped elsewhere)
def _needs_tensorrt():
    from qatsparse.export.tensorrt import tensorrt_available

    if not tensorrt_available():
        pytest.skip("TensorRT is not importable here (needs NVIDIA's wheel and a CUDA GPU)")


@pytest.mark.gpu
def test_validate_engine_adds_a_tensorrt_row_to_the_same_report(digits_run):
    """`qatsparse validate --engine` on the hand-off engine: the same report, plus a `tensorrt` row."""
    _needs_tensorrt()
    from qatsparse.export.tensorrt import build_engine

    cfg, ckpt, fit_report = digits_run
    out = Path(fit_report["artifacts"]["report.json"]).parent
    plan = out / "python_build" / "model.plan"  # build.json beside it describes the engine
    build_engine(out / "model.onnx", plan, (1, 32, 256), 1.0, timing_cache=plan.with_name("timing.cache"))
    run_cli(["validate", "--config", str(cfg), "--ckpt_path", str(ckpt), "--engine", str(plan)])
    report = json.loads((out / "report.json").read_text())
    assert set(report["backends"]) == {"pytorch_fp32", "pytorch_qat", "onnxruntime", "tensorrt"}
    trt, ort = report["backends"]["tensorrt"], report["backends"]["onnxruntime"]
    assert abs(trt["metrics"]["top1"] - ort["metrics"]["top1"]) <= 0.01
    assert trt["precision"].startswith("engine: ") and "int8" in trt["precision"]
    assert report["agreement"]["tensorrt"]["output"]["top1_agreement"] >= 0.98
    assert report["engine"]["sparsity"]["picked"] is not None


@pytest.mark.gpu
def test_bundle_scripts_build_check_and_validate_where_trtexec_and_polygraphy_are(digits_run):
    """The three README steps, as a user runs them on the TensorRT machine."""
    import shutil
    import subprocess

    _needs_tensorrt()
    if not shutil.which("trtexec") or not shutil.which("polygraphy"):
        pytest.skip("trtexec and polygraphy must be on PATH (TensorRT's bin/ and `pip install polygraphy`)")
    cfg, ckpt, fit_report = digits_run
    out = Path(fit_report["artifacts"]["report.json"]).parent
    for script in ("build.sh", "check.sh"):
        res = subprocess.run(["bash", str(out / "tensorrt" / script)], capture_output=True, text=True, timeout=1800)
        assert res.returncode == 0, f"{script}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert "PASSED" in res.stdout  # Polygraphy's verdict on the engine vs ONNX Runtime
    run_cli(["validate", "--config", str(cfg), "--ckpt_path", str(ckpt), "--engine", str(out / "tensorrt/model.plan")])
    report = json.loads((out / "report.json").read_text())
    assert report["engine"]["built_by"] == "trtexec (build.sh)" and report["engine"]["inspector"]["layers"]
    top1 = {b: report["backends"][b]["metrics"]["top1"] for b in ("tensorrt", "onnxruntime")}
    assert top1["tensorrt"] >= top1["onnxruntime"] - 0.01
