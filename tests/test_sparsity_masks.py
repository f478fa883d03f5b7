"""2:4 masks, eligibility, check_2to4 on modules and on hand-built ONNX graphs, summaries."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from qatsparse.sparsity import (
    PRUNED_METADATA_KEY,
    MaskSet,
    check_2to4,
    compute_2to4_mask,
    compute_masks,
    find_prunable,
    format_summary,
    is_2to4,
    prune_2to4,
    set_pruned_record,
    sparsity_metrics,
    worst_group,
)

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


# ------------------------------------------------------------------ masks
def test_mask_keeps_two_largest_of_every_input_channel_group_for_every_tap():
    torch.manual_seed(0)
    w = torch.randn(8, 16, 3, 3)
    mask = compute_2to4_mask(w)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    for o, kh, kw, g in itertools.product(range(8), range(3), range(3), range(4)):
        group = w[o, 4 * g : 4 * g + 4, kh, kw].abs()
        kept = mask[o, 4 * g : 4 * g + 4, kh, kw]
        assert int(kept.sum()) == 2
        assert set(torch.nonzero(kept).flatten().tolist()) == set(group.topk(2).indices.tolist())


def test_mask_of_linear_groups_along_in_features_and_ties_go_to_lower_index():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, -5.0, 0.0, 4.0]])
    assert compute_2to4_mask(w).tolist() == [[True, True, False, False, False, True, False, True]]


def test_mask_is_the_same_for_channels_last_weights():
    torch.manual_seed(1)
    w = torch.randn(16, 32, 3, 3)
    cl = w.to(memory_format=torch.channels_last)
    assert torch.equal(compute_2to4_mask(w), compute_2to4_mask(cl))
    conv = nn.Conv2d(32, 16, 3).to(memory_format=torch.channels_last)
    prune_2to4(conv)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert is_2to4(conv.weight) and float((conv.weight == 0).float().mean()) == 0.5


def test_mask_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 4"):
        compute_2to4_mask(torch.ones(4, 6))
    with pytest.raises(ValueError, match="shape"):
        compute_2to4_mask(torch.ones(8))


def test_worst_group_reports_count_and_position():
    w = torch.zeros(8, 16, 3, 3)
    w[5, 8:11, 2, 1] = 1.0  # 3 nonzeros in the group starting at input channel 8
    assert worst_group(w) == (3, (5, 8, 2, 1))
    assert worst_group(torch.ones(2, 6)) == (4, ())


# ------------------------------------------------------------------ eligibility
class _Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ok = nn.Conv2d(16, 32, 3)
        self.dw = nn.Conv2d(32, 32, 3, groups=32)
        self.grouped = nn.Conv2d(32, 32, 1, groups=2)
        self.cout = nn.Conv2d(32, 12, 1)
        self.cin = nn.Conv2d(12, 16, 1)
        self.head = nn.Linear(32, 16)
        self.fc = nn.Linear(64, 10)


def test_eligibility_reasons():
    e = find_prunable(_Zoo(), exclude=["^head$"])
    assert list(e.eligible) == ["ok"]
    assert e.skipped["dw"].startswith("depthwise conv")
    assert e.skipped["grouped"].startswith("grouped conv (groups=2)")
    assert e.skipped["cout"] == "C_out=12 not a multiple of 8"
    assert e.skipped["cin"] == "C_in=12 not a multiple of 16"
    assert e.skipped["head"] == "excluded by user"
    assert e.skipped["fc"] == "C_out=10 not a multiple of 8"


def test_include_limits_and_unmatched_include_is_an_error_naming_it():
    e = find_prunable(_Zoo(), include=["^ok$", "head"])
    assert sorted(e.eligible) == ["head", "ok"]
    assert e.skipped["dw"] == "not matched by include"
    with pytest.raises(ValueError, match="'layer9_conv' matches no prunable weight"):
        find_prunable(_Zoo(), include=["ok", "layer9_conv"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        find_prunable(_Zoo(), exclude=["(unclosed"])


def test_compute_masks_does_not_touch_the_model_and_prune_does():
    torch.manual_seed(0)
    model = _Zoo()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = compute_masks(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(masks.masks) == {"ok", "head"}
    prune_2to4(model)
    set_pruned_record(model, ["ok", "head"])
    assert check_2to4(model) == []
    bad = {v.layer: v for v in check_2to4(model, layers="all")}
    assert set(bad) == {"dw", "grouped", "cout", "cin", "fc"}
    assert bad["dw"].worst_group == 4 and "not a multiple of 4" in bad["dw"].detail


def test_check_module_names_the_worst_group_and_needs_a_record():
    lin = nn.Linear(16, 8)
    with pytest.raises(ValueError, match="layers='all'"):
        check_2to4(lin)
    with pytest.raises(ValueError, match="'pruned', 'all' or a list"):
        check_2to4(lin, layers="everything")  # type: ignore[arg-type]
    prune_2to4(lin)
    with torch.no_grad():
        lin.weight[3, 4:8] = 1.0
    [v] = check_2to4(lin, layers=[""])
    assert (v.worst_group, v.index) == (4, (3, 4))
    [missing] = check_2to4(lin, layers=["nope"])
    assert missing.worst_group == -1


def test_maskset_state_roundtrip_and_shape_check():
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(16, 16))
    masks = prune_2to4(model)
    again = MaskSet.from_state_dict(masks.state_dict())
    assert again.masks.keys() == masks.masks.keys() and again.skipped == masks.skipped
    assert all(torch.equal(again.masks[k], masks.masks[k].bool()) for k in masks.masks)
    other = nn.Sequential(nn.Linear(32, 8), nn.Linear(16, 16))
    with pytest.raises(ValueError, match="mask of '0' has shape"):
        again.apply(other)
    with pytest.raises(KeyError, match="'1'"):
        again.apply(nn.Sequential(nn.Linear(16, 8)))


def test_bound_masks_take_the_strides_of_channels_last_weights():
    """The post-step re-masking is one fused multi-tensor multiply only when each mask has its weight's
    strides; a mask computed on a contiguous copy of a channels_last weight is restrided when bound."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 1)).to(memory_format=torch.channels_last)
    masks = compute_masks(model)
    assert masks.masks["0"].stride() != model[0].weight.stride()  # the case being fixed: a 3x3 conv
    weights, bound = masks.bind(model)
    assert [m.stride() for m in bound] == [w.stride() for w in weights]
    for m, name in zip(bound, masks.masks):
        assert torch.equal(m, compute_masks(model).masks[name].to(m.dtype))  # the same values
    with torch.no_grad():
        for w in weights:
            w.add_(1.0)
    masks.apply(model)
    assert check_2to4(model, layers="all") == []


def test_summary_and_metrics():
    model = _Zoo()
    masks = prune_2to4(model, exclude=["head"])
    m = {k.removeprefix("qatsparse/sparsity/"): v for k, v in sparsity_metrics(model, list(masks.masks)).items()}
    assert m["layer_zero_share/ok"] == 0.5 and m["pruned_layer_zero_share"] == 0.5 and m["pruned_layers"] == 1
    total = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert m["zero_share"] == pytest.approx(model.ok.weight.numel() / 2 / total) == m["pruned_weight_share"]
    text = format_summary(masks, model)
    assert text.startswith("2:4 sparsity: pruned 1 of 7 Conv2d/Linear weights")
    assert "depthwise conv: not supported by sparse kernels: dw" in text
    assert "excluded by user: head" in text
    assert len(text.splitlines()) <= 12


# ------------------------------------------------------------------ ONNX, hand-built graphs
def _two_four(shape: tuple[int, ...], axis: int, seed: int = 0) -> np.ndarray:
    """A random array that is 2:4 along ``axis`` and dense (no zeros) otherwise."""
    w = torch.from_numpy(np.random.default_rng(seed).normal(size=shape).astype(np.float32))
    moved = w.movedim(axis, 1)
    flat = moved.reshape(moved.shape[0], moved.shape[1], -1).permute(0, 2, 1).reshape(-1, moved.shape[1])
    flat = flat * compute_2to4_mask(flat)
    back = flat.reshape(moved.shape[0], -1, moved.shape[1]).permute(0, 2, 1).reshape(moved.shape)
    return back.movedim(1, axis).contiguous().numpy()


def _model(nodes, inits, inputs, out_shape, path, record=None):
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if record is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = PRUNED_METADATA_KEY, json.dumps(record)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _x(name: str, shape: list[int]):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _gemm(b: np.ndarray, trans_b: int, path, pre=()):
    k = b.shape[1] if trans_b else b.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    src = pre[-1].output[0] if pre else "B"
    nodes = [*pre, helper.make_node("Gemm", ["x", src], ["y"], name="gemm", transB=trans_b)]
    return _model(nodes, {"B": b}, [_x("x", [2, k])], [2, n], path)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_onnx_gemm_checks_the_reduction_axis_given_transB(tmp_path, trans_b):
    k_axis = 1 if trans_b else 0
    shape = (8, 16) if trans_b else (16, 8)
    good = _gemm(_two_four(shape, k_axis), trans_b, tmp_path / "good.onnx")
    assert check_2to4(good, layers="all") == []
    wrong = _gemm(_two_four(shape, 1 - k_axis), trans_b, tmp_path / "wrong.onnx")  # 2:4 on the other axis
    [v] = check_2to4(wrong, layers="all")
    assert v.layer == "gemm" and v.worst_group >= 3 and f"axis {k_axis}" in v.detail


def test_onnx_matmul_checks_axis_0(tmp_path):
    def mm(b, name):
        node = helper.make_node("MatMul", ["x", "B"], ["y"], name="mm")
        return _model([node], {"B": b}, [_x("x", [2, b.shape[0]])], [2, b.shape[1]], tmp_path / name)

    assert check_2to4(mm(_two_four((16, 8), 0), "good.onnx"), layers="all") == []
    assert [v.layer for v in check_2to4(mm(_two_four((16, 8), 1), "bad.onnx"), layers="all")] == ["mm"]


@pytest.mark.parametrize("perm", [[1, 0], None])
def test_onnx_transpose_fed_weight_maps_the_axis(tmp_path, perm):
    # Gemm(transB=1) reduces B=(N, K) along axis 1 = axis 0 of the stored (K, N) weight.
    kw = {"perm": perm} if perm else {}
    t = helper.make_node("Transpose", ["W"], ["Wt"], **kw)

    def build(w, name):
        nodes = [t, helper.make_node("Gemm", ["x", "Wt"], ["y"], name="gemm", transB=1)]
        return _model(nodes, {"W": w}, [_x("x", [2, 16])], [2, 8], tmp_path / name)

    assert check_2to4(build(_two_four((16, 8), 0), "good.onnx"), layers="all") == []
    assert len(check_2to4(build(_two_four((16, 8), 1), "bad.onnx"), layers="all")) == 1


def _conv_qdq(w: np.ndarray, path, int8_initializer: bool, record=None):
    m = w.shape[0]
    scale = (np.abs(w).reshape(m, -1).max(1) / 127).astype(np.float32)
    zp = np.zeros(m, np.int8)
    inits = {"scale": scale, "zp": zp}
    nodes = []
    if int8_initializer:  # what constant folding of Q(W) leaves: DQ(int8 initializer)
        inits["Wq"] = np.clip(np.round(w / scale[:, None, None, None]), -127, 127).astype(np.int8)
    else:  # Cast(fp16 W) -> Q -> DQ
        inits["W16"] = w.astype(np.float16)
        nodes += [
            helper.make_node("Cast", ["W16"], ["W"], to=TensorProto.FLOAT),
            helper.make_node("QuantizeLinear", ["W", "scale", "zp"], ["Wq"], axis=0),
        ]
    nodes += [
        helper.make_node("DequantizeLinear", ["Wq", "scale", "zp"], ["Wdq"], axis=0),
        helper.make_node("Conv", ["x", "Wdq"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, inits, [_x("x", [1, w.shape[1], 4, 4])], [1, m, 4, 4], path, record)


@pytest.mark.parametrize("int8_initializer", [True, False])
def test_onnx_conv_through_qdq_and_cast(tmp_path, int8_initializer):
    w = _two_four((8, 16, 3, 3), 1)
    path = _conv_qdq(w, tmp_path / "good.onnx", int8_initializer, record={"conv": "conv"})
    assert check_2to4(path) == []
    bad = w.copy()
    bad[6, 12:16, 0, 2] = 0.5  # one dense group
    path = _conv_qdq(bad, tmp_path / "bad.onnx", int8_initializer, record={"conv": "conv"})
    [v] = check_2to4(path)
    assert (v.layer, v.worst_group, v.index) == ("conv", 4, (6, 12, 0, 2))
    import onnxruntime as ort  # the graph is real: it runs

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones((1, 16, 4, 4), np.float32)})[0].shape == (1, 8, 4, 4)


def test_onnx_default_checks_only_recorded_layers(tmp_path):
    w_conv, dense = _two_four((8, 16, 1, 1), 1), np.ones((8, 8), np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "Wc"], ["h"], name="conv"),
        helper.make_node("Flatten", ["h"], ["f"]),
        helper.make_node("MatMul", ["f", "Wd"], ["y"], name="dense_mm"),
        helper.make_node("MatMul", ["f", "act"], ["z"], name="act_mm"),  # weight is a graph input
    ]
    inputs = [_x("x", [1, 16, 1, 1]), _x("act", [8, 8])]
    inits = {"Wc": w_conv, "Wd": dense}

    def build(name, record):
        graph = helper.make_graph(
            nodes,
            "g",
            inputs,
            [_x("y", [1, 8]), _x("z", [1, 8])],
            initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        if record is not None:
            entry = model.metadata_props.add()
            entry.key, entry.value = PRUNED_METADATA_KEY, json.dumps(record)
        onnx.save(model, str(tmp_path / name))
        return tmp_path / name

    path = build("m.onnx", {"conv": "conv"})
    assert check_2to4(path) == []
    assert [(v.layer, v.worst_group) for v in check_2to4(path, layers="all")] == [("dense_mm", 4)]
    assert [(v.layer, v.worst_group) for v in check_2to4(path, layers=["act_mm", "nope"])] == [
        ("act_mm", -1),
        ("nope", -1),
    ]
    assert [v.layer for v in check_2to4(build("lie.onnx", {"fc": "dense_mm"}))] == ["dense_mm"]
    with pytest.raises(ValueError, match=r"no 'qatsparse\.pruned_layers' metadata"):
        check_2to4(build("none.onnx", None))
    with pytest.raises(FileNotFoundError):
        check_2to4(tmp_path / "missing.onnx")


def test_layers_that_transform_their_weight_are_skipped_with_the_reason():
    """timm's weight-standardised convs (ResNetV2-BiT, NF-Nets) compute with ``(W - mean) / std``: pruned zeros would
    not reach the graph, so they are named, not pruned; a subclass that only pads (Conv2dSame) is pruned."""
    layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(
        layers.StdConv2d(16, 16, 3),
        layers.ScaledStdConv2d(16, 16, 3),
        layers.Conv2dSame(16, 16, 3),
        nn.Conv2d(16, 16, 1),
    )
    torch.nn.init.zeros_(model[1].gain)  # NF-Nets start a block's last conv at gain 0: a constant output
    state = torch.random.get_rng_state()
    e = find_prunable(model)
    assert torch.equal(state, torch.random.get_rng_state())  # the check draws from its own generator
    assert sorted(e.eligible) == ["2", "3"]
    assert "StdConv2d computes with a transform of its weight" in e.skipped["0"]
    assert "ScaledStdConv2d computes with a transform" in e.skipped["1"]
