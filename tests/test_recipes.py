"""Every shipped recipe: parses (--print_config), has a version and a header, and runs a short smoke fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from qatsparse.cli import RECIPE_VERSIONS, list_recipes, main, recipe_paths
from qatsparse.sparsity import check_2to4
from tests.test_recipes_helpers import load_recipe, shortened

REPO = Path(__file__).resolve().parents[1]
RECIPES = [
    "cifar10_resnet18_int8_sparse",
    "digits_fp16",
    "digits_int8_sparse",
    "digits_transformer_int8_sparse",
    "imagefolder_resnet18_int8_sparse",
    "two_head_int8",
]


def test_the_six_recipes_are_shipped_and_mirrored_at_the_top_level():
    assert sorted(recipe_paths()) == RECIPES
    for name, path in recipe_paths().items():
        top = REPO / "recipes" / f"{name}.yaml"
        assert top.read_text() == path.read_text(), f"recipes/{name}.yaml differs from {path}: copy it over"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_prints_its_config(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", name, "--print_config"])
    assert exc.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    recipe = load_recipe(name)
    assert cfg["version"] == recipe["version"] in RECIPE_VERSIONS
    assert cfg["model"]["class_path"] == recipe["model"]["class_path"]
    assert [c["class_path"] for c in cfg["trainer"]["callbacks"]] == [
        "qatsparse.TwoFourSparsity",
        "qatsparse.QuantizationAwareTraining",
        "qatsparse.TensorRTExport",
    ]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_header_describes_it_and_states_expected_results(name):
    text = recipe_paths()[name].read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert text.startswith(f"# {name} -- ")
    assert "Expected" in header
    assert list_recipes()[name] and not list_recipes()[name].startswith(name)
    stages = load_recipe(name)["trainer"]
    prune = next(c for c in stages["callbacks"] if "TwoFour" in c["class_path"])["init_args"]["start_step"]
    qat = next(c for c in stages["callbacks"] if "Quantization" in c["class_path"])["init_args"]["start_step"]
    assert 0 <= prune < qat < stages["max_steps"]  # staged: prune, then QAT, then export at the end


def _report(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "runs" / name / "report.json").read_text())


def test_digits_fp16_smoke(tmp_path):
    cfg = shortened("digits_fp16", tmp_path, 40, 15, 30, model={"widths": [16, 32]})
    main(["fit", "--config", str(cfg)])
    report = _report(tmp_path, "digits_fp16")
    assert report["quantization"]["precision"] == "fp16"
    assert set(report["backends"]) >= {"pytorch_fp32", "pytorch_qat", "onnxruntime"}
    out = tmp_path / "runs" / "digits_fp16"
    assert check_2to4(out / "model.onnx") == []
    types = {i.data_type for i in onnx.load(str(out / "model.onnx")).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    assert (out / "config.yaml").is_file()  # the resolved config is saved beside the artifacts


def test_digits_transformer_smoke_prunes_and_quantizes_the_attention(tmp_path):
    cfg = shortened("digits_transformer_int8_sparse", tmp_path, 30, 10, 20, model={"d_model": 32, "ffn": 64})
    main(["fit", "--config", str(cfg)])
    report = _report(tmp_path, "digits_transformer_int8_sparse")
    attn = [f"encoder.layers.{i}.self_attn" for i in range(2)]
    pruned = set(report["sparsity"]["pruned_layers"])
    assert {f"{a}.in_proj_weight" for a in attn} | {f"{a}.out_proj" for a in attn} <= pruned
    assert set(attn) <= set(report["quantization"]["quantized"])
    assert report["backends"]["onnxruntime"]["precision"] == "int8+fp16"
    assert report["onnxruntime"]["level"] in ("all", "disabled")  # the level validation used, and why
    assert check_2to4(tmp_path / "runs" / "digits_transformer_int8_sparse" / "model.onnx") == []


def test_transformer_recipe_numbers_in_the_docs_and_header_are_the_scripts_tables_of_the_raw_json():
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import transformer_recipe
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    docs = (REPO / "docs" / "quantization.md").read_text()
    header = recipe_paths()["digits_transformer_int8_sparse"].read_text()
    for name in ("digits_transformer.json", "digits_transformer_patch2.json"):
        results = json.loads((REPO / "benchmarks" / "results" / name).read_text())
        assert transformer_recipe.table(results) in docs, name
    shipped = json.loads((REPO / "benchmarks" / "results" / "digits_transformer.json").read_text())
    for row in transformer_recipe.table(shipped).splitlines()[2:5]:  # dense, int8_2to4, int8_2to4_attention_matmuls
        assert "# " + row in header


def test_two_head_smoke_exports_two_inputs_two_outputs_with_dynamic_batch(tmp_path):
    import onnxruntime as ort
    import torch

    from qatsparse.examples import TwoHeadNet, generate_positions

    cfg = shortened(
        "two_head_int8",
        tmp_path,
        24,
        8,
        16,
        model={"width": 16, "blocks": 1},
        data={"n_train": 512, "n_val": 128, "batch_size": 32},
    )
    main(["fit", "--config", str(cfg)])
    report = _report(tmp_path, "two_head_int8")
    out = tmp_path / "runs" / "two_head_int8"
    assert report["quantization"]["precision"] == "int8"
    assert "policy/top1" in report["backends"]["onnxruntime"]["metrics"]
    assert set(report["agreement"]["onnxruntime"]) == {"policy", "value"}
    assert report["agreement"]["onnxruntime"]["value"]["cosine"] > 0.9
    assert check_2to4(out / "model.onnx") == []
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["board", "aux"]
    assert [o.name for o in sess.get_outputs()] == ["policy", "value"]
    assert all(isinstance(i.shape[0], str) for i in sess.get_inputs())  # dynamic batch axis
    for n in (1, 7):
        (board, aux), _ = generate_positions(n, seed=n)
        policy, value = sess.run(None, {"board": board.numpy(), "aux": aux.numpy()})
        assert policy.shape == (n, 64) and value.shape == (n, 1)
        assert np.all(np.abs(value) <= 1.0)
    assert isinstance(TwoHeadNet().example_input_array, tuple)
    assert torch.is_tensor(TwoHeadNet().example_input_array[1])


def _write_images(root: Path, classes: int, per_class: int, size: int = 40) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            img[..., c % 3] = 255  # a learnable colour cue per class
            Image.fromarray(img).save(d / f"{i}.png")


def test_imagefolder_smoke_on_generated_pngs(tmp_path):
    root = tmp_path / "images"
    _write_images(root, classes=3, per_class=8)
    cfg = shortened(
        "imagefolder_resnet18_int8_sparse",
        tmp_path,
        6,
        2,
        4,
        trainer={"accelerator": "cpu", "enable_checkpointing": False, "enable_progress_bar": False},
        model={"num_classes": 3, "image_size": 32},
        data={"root": str(root), "image_size": 32, "batch_size": 8, "num_workers": 0, "val_fraction": 0.25},
    )
    main(["fit", "--config", str(cfg)])
    report = _report(tmp_path, "imagefolder_resnet18_int8_sparse")
    assert report["quantization"]["precision"] == "int8"
    assert len(report["sparsity"]["pruned_layers"]) >= 10
    assert check_2to4(tmp_path / "runs" / "imagefolder_resnet18_int8_sparse" / "model.onnx") == []


def test_imagefolder_recipe_without_root_fails_before_training_naming_data_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"data\.root is required"):
        main(["fit", "--config", "imagefolder_resnet18_int8_sparse"])
    assert not (tmp_path / "runs").exists()


def test_imagefolder_num_classes_mismatch_is_named(tmp_path):
    root = tmp_path / "images"
    _write_images(root, classes=2, per_class=4)
    cfg = shortened(
        "imagefolder_resnet18_int8_sparse",
        tmp_path,
        2,
        0,
        1,
        trainer={"accelerator": "cpu"},
        model={"num_classes": 5, "image_size": 32},
        data={"root": str(root), "image_size": 32, "batch_size": 2, "num_workers": 0},
    )
    with pytest.raises(ValueError, match="num_classes=5 but the data has 2 classes"):
        main(["fit", "--config", str(cfg)])


class _GeneratedCIFAR10:
    """Stands in for torchvision's CIFAR10 in the tests only: 32x32 RGB PIL images, 10 classes."""

    def __init__(self, root, train=True, transform=None, download=False):
        from PIL import Image

        rng = np.random.default_rng(0 if train else 1)
        n = 32 if train else 16
        self.targets = (np.arange(n) % 10).tolist()
        self.images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        return (self.transform(img) if self.transform else img), self.targets[i]


def test_cifar10_smoke_with_generated_data(tmp_path, monkeypatch):
    import qatsparse.examples.cifar10 as cifar

    monkeypatch.setattr(cifar, "cifar10_dataset_class", lambda: _GeneratedCIFAR10)
    cfg = shortened(
        "cifar10_resnet18_int8_sparse",
        tmp_path,
        4,
        1,
        2,
        trainer={"accelerator": "cpu", "enable_checkpointing": False, "enable_progress_bar": False},
        data={"root": str(tmp_path / "cifar"), "batch_size": 8, "num_workers": 0},
    )
    main(["fit", "--config", str(cfg)])
    report = _report(tmp_path, "cifar10_resnet18_int8_sparse")
    assert report["quantization"]["precision"] == "int8"
    assert check_2to4(tmp_path / "runs" / "cifar10_resnet18_int8_sparse" / "model.onnx") == []


def test_cifar10_without_internet_says_where_to_put_the_archive(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.cifar

    from qatsparse.examples import CIFAR10DataModule

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    dm = CIFAR10DataModule(root=str(tmp_path / "c10"), download=True)
    with pytest.raises(RuntimeError, match=r"could not download CIFAR-10.*cifar-10-python\.tar\.gz.*download: false"):
        dm.prepare_data()
    with pytest.raises(RuntimeError, match=r"CIFAR-10 is not in"):
        CIFAR10DataModule(root=str(tmp_path / "c10"), download=False).prepare_data()


def _init_args(cls) -> list[str]:
    import inspect

    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def test_docs_list_every_callback_and_example_argument():
    from qatsparse import QuantizationAwareTraining, TensorRTExport, TwoFourSparsity
    from qatsparse import examples as ex

    callbacks = (REPO / "docs" / "callbacks.md").read_text()
    for cls in (TwoFourSparsity, QuantizationAwareTraining, TensorRTExport):
        missing = [a for a in _init_args(cls) if f"| `{a}` |" not in callbacks]
        assert not missing, f"docs/callbacks.md lacks {cls.__name__} arguments {missing}"
    recipes = (REPO / "docs" / "recipes.md").read_text()
    classes = (
        ex.ResidualCNN,
        ex.DigitsTransformer,
        ex.ImageClassifier,
        ex.TwoHeadNet,
        ex.DigitsDataModule,
        ex.ImageFolderDataModule,
        ex.CIFAR10DataModule,
        ex.TwoHeadDataModule,
    )
    for cls in classes:
        missing = [a for a in _init_args(cls) if f"`{a}`" not in recipes]
        assert not missing, f"docs/recipes.md lacks {cls.__name__} keys {missing}"
    for name in RECIPES:
        assert f"`{name}`" in recipes
