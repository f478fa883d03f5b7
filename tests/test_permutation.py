"""Channel permutation for 2:4: search quality, function preservation on real models, optimizer state."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from qatsparse.examples import ImageClassifier, ResidualCNN, TwoHeadNet
from qatsparse.sparsity import check_2to4, find_prunable, prune_2to4, set_pruned_record
from qatsparse.sparsity.magnitude import kept_magnitude, overall
from qatsparse.sparsity.permutation import (
    Move,
    SearchConfig,
    apply_channel_permutations,
    find_channel_groups,
    kept_sum,
    permute_for_2to4,
    search_permutation,
    undo_channel_permutations,
)


# ------------------------------------------------------------------ search
def _best_by_brute_force(x: torch.Tensor) -> float:
    """Magnitude kept by the best of all partitions of the columns into groups of 4."""
    best = 0.0

    def rec(rest: list[int], order: list[int]) -> None:
        nonlocal best
        if not rest:
            best = max(best, kept_sum(x[:, order]))
            return
        for comb in itertools.combinations(rest[1:], 3):
            group = [rest[0], *comb]
            rec([c for c in rest if c not in group], order + group)

    rec(list(range(x.shape[1])), [])
    return best


@pytest.mark.parametrize("channels", [8, 12])
def test_search_finds_the_optimum_of_small_matrices(channels):
    """Two groups (8 channels): the exhaustive stripe search is the brute force, so the optimum. Three
    groups (12): moves between pairs of groups only (apex's 12-column window is left out), so within 0.5 %."""
    g = torch.Generator().manual_seed(channels)
    for _ in range(4):
        x = torch.randn(6, channels, generator=g).abs() * torch.rand(channels, generator=g) * 3
        perm, stats = search_permutation(x)
        assert sorted(perm.tolist()) == list(range(channels))
        assert stats.kept_after == pytest.approx(kept_sum(x[:, perm]), rel=1e-9)
        best = _best_by_brute_force(x)
        if channels == 8:
            assert stats.kept_after == pytest.approx(best, rel=1e-6)
        else:
            assert best * 0.995 <= stats.kept_after <= best * (1 + 1e-9)
        assert stats.kept_after > stats.kept_before


def test_search_is_deterministic_never_worse_and_spreads_large_columns():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 32, generator=g)
    x[:, :8] += 10.0  # eight large input channels side by side: plain 2:4 loses two per group
    p1, s1 = search_permutation(x)
    p2, _ = search_permutation(x)
    assert torch.equal(p1, p2)
    big = [c for c in range(32) if int(p1[c]) < 8]
    assert all(sum(1 for c in big if c // 4 == grp) <= 2 for grp in range(8))  # at most 2 large per group
    assert s1.kept_after > s1.kept_before + 64 * 4 * 9  # the four dropped large weights per row are back
    perfect = torch.zeros(16, 16)
    perfect[:, ::2] = 1.0  # already 2 nonzeros in every group: nothing to gain
    perm, stats = search_permutation(perfect)
    assert torch.equal(perm, torch.arange(16)) and stats.kept_after == stats.kept_before == stats.total


def test_search_config_is_validated():
    with pytest.raises(ValueError, match="max_channels"):
        SearchConfig(max_channels=10)
    with pytest.raises(ValueError, match="escapes"):
        SearchConfig(escapes=-1)
    with pytest.raises(ValueError, match="C a multiple of 4"):
        search_permutation(torch.ones(3, 6))


# ------------------------------------------------------------------ function preservation
def _random_moves(plan, seed: int = 0) -> list[Move]:
    g = torch.Generator().manual_seed(seed)
    return [Move(grp.slots, torch.randperm(grp.size, generator=g)) for grp in plan.groups if grp.permutable]


def _randomize_norms(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics/affine (a fresh model's are identities that hide mistakes)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.2, generator=g)


def _outputs(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*inputs)
    return list(out) if isinstance(out, tuple) else [out]


def _check_preserved(model: nn.Module, inputs: tuple, tol: float = 1e-5, relative: bool = False):
    """Random permutations of every permutable group leave the outputs unchanged; every pruned layer is
    either permuted or listed with a reason."""
    model.eval()
    pruned = list(find_prunable(model).eligible)
    ref = _outputs(model, inputs)
    plan = find_channel_groups(model, inputs, pruned)
    assert set(plan.permuted_layers) | set(plan.not_permuted) == set(pruned)
    assert not set(plan.permuted_layers) & set(plan.not_permuted)
    moves = _random_moves(plan)
    assert moves, "nothing permutable"
    apply_channel_permutations(model, moves)
    out = _outputs(model, inputs)
    for a, b in zip(ref, out):
        diff = float((a - b).abs().max())
        scale = float(a.abs().max()) if relative else 1.0
        assert diff <= tol * scale, (diff, scale)
    undo_channel_permutations(model, moves)
    return plan


def _image(n: int = 2, c: int = 3, size: int = 32) -> tuple[torch.Tensor]:
    return (torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(0)),)


def test_resnet18_every_layer_permuted_through_residual_adds():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    _randomize_norms(model)
    plan = _check_preserved(model, _image())
    assert plan.not_permuted == {}  # conv1 (C_in=3) is not pruned, every pruned layer is permuted
    assert "layer1.1.conv1" in plan.permuted_layers and "layer4.0.downsample.0" in plan.permuted_layers
    # residual stream of layer1: the stem conv, every block's last conv, read by layer2's first conv and shortcut
    stream = next(g for g in plan.groups if any(r.layer == "layer2.0.downsample.0" for r in g.readers))
    assert {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"} <= {r.layer for r in stream.readers}
    assert {s.tensor for s in stream.slots} >= {"bn1.running_mean", "layer1.0.bn2.weight", "conv1.weight"}


def test_resnet50_outputs_unchanged_in_fp32_and_exactly_in_fp64():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    # Logits of ~20: reordered FP32 sums round differently (~1e-6 relative); float64 shows it is exact.
    _check_preserved(model, _image(), tol=1e-5, relative=True)
    _check_preserved(model.double(), tuple(t.double() for t in _image()), tol=1e-12, relative=True)


def test_mobilenet_v3_depthwise_and_squeeze_excitation():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    _randomize_norms(model)
    plan = _check_preserved(model, _image())
    # the expand conv's channels run through the depthwise conv and the SE scale into the project conv
    se = next(g for g in plan.groups if any(r.layer == "features.4.block.3.0" for r in g.readers))
    tensors = {s.tensor for s in se.slots}
    assert {"features.4.block.0.0.weight", "features.4.block.1.0.weight", "features.4.block.2.fc2.bias"} <= tensors
    assert se.permutable


def test_convnext_layer_norm_layer_scale_and_permute():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(32, 64, 2), CNBlockConfig(64, None, 1)], num_classes=10)
    plan = _check_preserved(model, _image())
    assert "features.1.0.block.3" in plan.permuted_layers  # the MLP's first Linear, behind permute + LayerNorm
    slots = {s.tensor for g in plan.groups for s in g.slots}
    assert {"features.1.0.layer_scale", "features.2.0.weight", "features.1.0.block.0.weight"} <= slots


def test_vit_mlp_permuted_attention_listed():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # zero-initialised: the outputs would not tell anything
    plan = _check_preserved(model, _image())
    assert "encoder.layers.encoder_layer_0.mlp.3" in plan.permuted_layers  # the MLP's hidden channels
    why = plan.not_permuted["encoder.layers.encoder_layer_0.self_attention.out_proj"]
    assert "MultiheadAttention" in why
    assert "MultiheadAttention" in plan.not_permuted["encoder.layers.encoder_layer_1.mlp.0"]


@pytest.mark.parametrize("name", ["digits", "imagefolder_resnet", "two_head"])
def test_example_models(name):
    torch.manual_seed(0)
    if name == "digits":
        model, inputs = ResidualCNN(), (torch.randn(2, 1, 8, 8),)
    elif name == "imagefolder_resnet":
        model, inputs = ImageClassifier(num_classes=10, cifar_stem=True, image_size=32), _image()
    else:
        model = TwoHeadNet()
        inputs = tuple(torch.cat([t, t.flip(0)]) for t in map(torch.randn_like, model.example_input_array))
    _randomize_norms(model)
    plan = _check_preserved(model, inputs)
    assert plan.permuted_layers


# ------------------------------------------------------------------ what cannot be permuted, and why
class _Concat(nn.Module):
    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(16, a, 3, padding=1), nn.Conv2d(16, b, 1)
        self.bn = nn.BatchNorm2d(a + b)
        self.c = nn.Conv2d(a + b, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.fc(torch.flatten(self.c(y), 1))  # flatten of (N, 16, 4, 4): channels mixed with space


def test_concatenation_permutes_each_input_within_its_slice():
    model = _Concat(16, 32)
    _randomize_norms(model)
    plan = _check_preserved(model, (torch.randn(2, 16, 4, 4),))
    readers = sorted((r.offset, g.size) for g in plan.groups if g.permutable for r in g.readers if r.layer == "c")
    assert readers == [(0, 16), (16, 32)]
    assert "reshape" in plan.not_permuted["fc"] or "flatten" in plan.not_permuted["fc"]


def test_concatenation_not_aligned_to_groups_of_4_is_blocked():
    model = _Concat(18, 30).eval()
    plan = find_channel_groups(model, (torch.randn(2, 16, 4, 4),), ["c"])
    assert "not a multiple of 4" in plan.not_permuted["c"]


class _Misc(nn.Module):
    """A module called twice, a grouped conv, attention, a flatten/transpose into a Linear, two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem2 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(3, 32, 3, padding=1)
        self.shared, self.mix = nn.Conv2d(32, 32, 1), nn.Conv2d(32, 32, 3, padding=1)
        self.grouped, self.after = nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.Conv2d(32, 32, 1)
        self.proj = nn.Linear(32, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.mix(self.shared(F.relu(self.shared(F.relu(self.stem(x))))))
        t = self.proj(a.flatten(2).transpose(1, 2))  # (N, HW, 32): channels last
        u, _ = self.attn(t, t, t)
        b = self.after(F.relu(self.grouped(self.stem2(x))))
        return self.out(u), b.mean((2, 3))


def test_unsupported_parts_are_listed_with_reasons():
    plan = _check_preserved(_Misc(), _image())
    assert plan.permuted_layers == ["mix", "proj", "shared"]
    why = plan.not_permuted
    assert set(why) == {"after", "out", "attn.out_proj", "attn.in_proj_weight"}
    assert "grouped conv 'grouped'" in why["after"]
    assert "MultiheadAttention 'attn'" in why["out"] and "MultiheadAttention 'attn'" in why["attn.out_proj"]
    assert (
        why["attn.in_proj_weight"] == "MultiheadAttention.in_proj_weight: only Conv1d/Conv2d/Linear layers are permuted"
    )
    # calling `shared` twice ties its input and output channels to the stem's: one group
    shared = next(g for g in plan.groups if any(r.layer == "shared" for r in g.readers))
    assert {("shared.weight", 0), ("shared.weight", 1), ("stem.weight", 0)} <= {
        (s.tensor, s.axis) for s in shared.slots
    }


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        self.head = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if float(y.mean()) > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            y = -y
        return self.head(y.mean((2, 3)))


def test_untraceable_model_is_analysed_part_by_part():
    plan = _check_preserved(_Untraceable(), _image())
    assert "torch.fx cannot trace" in plan.notes["<model>"]
    assert plan.permuted_layers == ["body.2"]  # inside the traceable child
    assert plan.not_permuted["head"].startswith("in '<model>'")


# ------------------------------------------------------------------ optimizer state and search on a model
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_optimizer_state_moves_with_the_weights(opt):
    """Training the permuted model (momentum/moments permuted too) is training the original, relabelled."""
    torch.manual_seed(0)
    a = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).double()  # fmt: skip  (float64: Adam would amplify FP32 rounding of reordered sums where gradients ~ 0)
    models = [a, copy.deepcopy(a), copy.deepcopy(a)]
    make = (
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3))
        if opt == "sgd"
        else (lambda p: torch.optim.AdamW(p, lr=1e-2))
    )
    opts = [make(m.parameters()) for m in models]
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 3, 8, 8, generator=g).double(), torch.randint(0, 10, (8,), generator=g)) for _ in range(6)]

    def step(i: int) -> None:
        for m, o in zip(models, opts):
            o.zero_grad()
            F.cross_entropy(m(data[i][0]), data[i][1]).backward()
            o.step()

    for i in range(3):
        step(i)
    plan = find_channel_groups(models[1], (data[0][0][:2],), ["3"])
    moves = _random_moves(plan, seed=3)
    apply_channel_permutations(models[1], moves, [opts[1]])  # weights and optimizer state
    apply_channel_permutations(models[2], moves)  # weights only: the state now belongs to other channels
    for i in range(3, 6):
        step(i)
    for m in models[1:]:
        undo_channel_permutations(m, moves)
    ref = dict(models[0].named_parameters())
    with torch.no_grad():
        same = max(float((p - ref[n]).abs().max()) for n, p in models[1].named_parameters())
        stale = max(float((p - ref[n]).abs().max()) for n, p in models[2].named_parameters())
    assert same < 1e-10 and stale > 1e-3


def test_permute_then_prune_keeps_more_and_exports_the_same_graph(tmp_path):
    onnx = pytest.importorskip("onnx")
    from qatsparse.export.onnx import export_onnx

    torch.manual_seed(0)
    model = ResidualCNN(widths=(32, 64)).eval()
    _randomize_norms(model)
    with torch.no_grad():  # trained-like weights: a few input channels carry most of the magnitude
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.in_channels >= 16:
                m.weight.mul_(torch.rand(m.in_channels).pow(3)[None, :, None, None] * 4)
    x = torch.randn(4, 1, 8, 8)
    ref = model(x)
    pruned = list(find_prunable(model, exclude=["fc"]).eligible)
    before = overall(kept_magnitude(model, pruned))
    export_onnx(model, (x[:1],), tmp_path / "dense.onnx")
    result = permute_for_2to4(model, (x[:2],), pruned, config=SearchConfig(escapes=2))
    after = overall(kept_magnitude(model, pruned))
    assert after.share > before.share + 0.01
    assert after.share == pytest.approx(sum(g.kept_after for g in result.groups) / after.total, rel=1e-4)
    assert float((model(x) - ref).abs().max()) <= 1e-5
    prune_2to4(model, exclude=["fc"])
    set_pruned_record(model, pruned)
    assert check_2to4(model) == []
    export_onnx(model, (x[:1],), tmp_path / "permuted.onnx")
    ops = [[n.op_type for n in onnx.load(tmp_path / f).graph.node] for f in ("dense.onnx", "permuted.onnx")]
    assert ops[0] == ops[1]  # the permutation is in the weights, not in the graph
    dense = check_2to4(tmp_path / "permuted.onnx", layers="all")
    assert len(dense) == 2  # only the stem conv (C_in=1) and the classifier, which were not pruned


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the search on the weights' device needs CUDA here")
def test_search_and_permutation_on_gpu():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).cuda().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    ref = model(x)
    pruned = list(find_prunable(model, exclude=["fc"]).eligible)
    before = overall(kept_magnitude(model, pruned))
    result = permute_for_2to4(model, (x,), pruned)
    assert overall(kept_magnitude(model, pruned)).share > before.share
    assert float((model(x) - ref).abs().max()) <= 1e-4 * float(ref.abs().max())  # TF32 convs may be on
    assert result.groups and all(g.kept_after >= g.kept_before for g in result.groups)
