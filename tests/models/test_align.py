"""Alignment module and loss: the vectorised loss equals METHOD.md's formula written naively."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fmbseg.models.align import AlignmentConfig, AlignmentModule, alignment_loss


def naive_loss(
    z: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, tau: float, negatives: str = "all"
) -> float:
    """METHOD.md stage 2, one patch at a time in float64 Python arithmetic.

    D_i = Σ_{j≠i} exp(z_i·z_j/τ) + Σ_k exp(z_i·t_k/τ), k over all K prototypes ("all", the
    paper's reading) or only the classes present in the batch ("batch", the ablation);
    L_t(k) per category present in the batch; L_p(i) SupCon; L = mean_k L_t + mean_i L_p.
    """
    idx = [i for i in range(len(labels)) if int(labels[i]) >= 0]
    zs = {i: z[i].double() / z[i].double().norm() for i in idx}
    present = sorted({int(labels[i]) for i in idx})
    negs = list(range(len(text))) if negatives == "all" else present
    ts = {k: text[k].double() / text[k].double().norm() for k in range(len(text))}

    def s(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b) / tau

    denom = {}
    for i in idx:
        d = sum(math.exp(s(zs[i], zs[j])) for j in idx if j != i)
        d += sum(math.exp(s(zs[i], ts[k])) for k in negs)
        denom[i] = d
    l_t = []
    for k in present:
        members = [i for i in idx if int(labels[i]) == k]
        l_t.append(
            -sum(math.log(math.exp(s(zs[i], ts[k])) / denom[i]) for i in members) / len(members)
        )
    l_p = []
    for i in idx:
        pos = [j for j in idx if j != i and int(labels[j]) == int(labels[i])]
        if pos:
            l_p.append(-sum(math.log(math.exp(s(zs[i], zs[j])) / denom[i]) for j in pos) / len(pos))
    return sum(l_t) / len(l_t) + (sum(l_p) / len(l_p) if l_p else 0.0)


@pytest.mark.parametrize("negatives", ["all", "batch"])
def test_loss_matches_naive_loop_with_singletons_and_ignored(negatives: str) -> None:
    g = torch.Generator().manual_seed(0)
    m, d, k = 23, 8, 6
    z = torch.randn(m, d, generator=g) * 3
    text = torch.randn(k, d, generator=g)
    labels = torch.randint(0, 4, (m,), generator=g)
    labels[[1, 5, 9, 17]] = -1  # ignored patches
    labels[3] = 5  # class 5 has a single patch: no L_p term for it
    # class 4 is absent: a negative in every denominator with "all", nowhere with "batch"
    for tau in (0.1, 0.5):
        got = float(alignment_loss(z, labels, text, tau, negatives))
        want = naive_loss(z, labels, text, tau, negatives)
        assert got == pytest.approx(want, abs=1e-5, rel=1e-5)
    # the two readings differ exactly by the absent prototype's share of the denominators
    assert naive_loss(z, labels, text, 0.1, "all") > naive_loss(z, labels, text, 0.1, "batch")


def test_loss_default_is_every_vocabulary_prototype_a_negative() -> None:
    g = torch.Generator().manual_seed(4)
    z = torch.randn(12, 6, generator=g)
    text = torch.randn(5, 6, generator=g, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, -1, 2, 2, 0, 1, 2, 0])  # classes 3 and 4 absent
    loss = alignment_loss(z, labels, text, 0.1)
    assert loss.item() == pytest.approx(naive_loss(z, labels, text.detach(), 0.1), abs=1e-5)
    loss.backward()
    assert text.grad is not None
    # the absent classes' prototypes are pushed away from the batch's patches
    assert (text.grad[3:].abs().sum(1) > 1e-6).all()
    moved = text.detach().clone()
    moved[4] = F.normalize(z[0], dim=0)  # an absent class now looks like patch 0
    assert float(alignment_loss(z, labels, moved, 0.1)) > loss.item() + 1e-3

    text.grad = None
    alignment_loss(z, labels, text, 0.1, "batch").backward()
    assert torch.equal(text.grad[3:], torch.zeros_like(text.grad[3:]))
    assert float(alignment_loss(z, labels, moved, 0.1, "batch")) == pytest.approx(
        float(alignment_loss(z, labels, text.detach(), 0.1, "batch")), abs=1e-6
    )


def test_loss_known_answer_one_patch_two_prototypes() -> None:
    # One patch of class 0 lying on t_0, t_1 orthogonal: no patch pairs, so
    # L = L_t(0) = -log(e^{1/τ} / (e^{1/τ} + e^{0})) = log(1 + e^{-1/τ}); with only the
    # batch's classes as negatives the single prototype is its own denominator: L = 0.
    z = torch.tensor([[2.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0])
    tau = 0.5
    assert float(alignment_loss(z, y, text, tau)) == pytest.approx(
        math.log1p(math.exp(-1 / tau)), abs=1e-6
    )
    assert float(alignment_loss(z, y, text, tau, "batch")) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("negatives", ["all", "batch"])
def test_loss_ignores_values_of_ignored_patches(negatives: str) -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(10, 4, generator=g)
    text = torch.randn(5, 4, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 1, -1, -1, 2, 2, 0])
    base = alignment_loss(z, labels, text, 0.1, negatives)
    z2 = z.clone()
    z2[5:7] = torch.randn(2, 4, generator=g) * 100
    assert torch.allclose(base, alignment_loss(z2, labels, text, 0.1, negatives))


@pytest.mark.parametrize("negatives", ["all", "batch"])
def test_loss_edge_cases_single_patch_and_all_singletons(negatives: str) -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 5, generator=g)
    text = torch.randn(4, 5, generator=g)
    one = torch.tensor([-1, 2, -1])
    assert float(alignment_loss(z, one, text, 0.2, negatives)) == pytest.approx(
        naive_loss(z, one, text, 0.2, negatives), abs=1e-6
    )
    singles = torch.tensor([0, 1, 3])
    assert float(alignment_loss(z, singles, text, 0.2, negatives)) == pytest.approx(
        naive_loss(z, singles, text, 0.2, negatives), abs=1e-6
    )
    z.requires_grad_(True)
    alignment_loss(z, one, text, 0.2, negatives).backward()  # one patch ("batch": L == 0)
    assert torch.isfinite(z.grad).all()
    z.grad = None
    alignment_loss(z, singles, text, 0.2, negatives).backward()
    assert torch.isfinite(z.grad).all() and (z.grad.abs().sum(1) > 0).all()


def test_loss_is_stable_at_tiny_temperature() -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(50, 16, generator=g, requires_grad=True)
    text = torch.randn(3, 16, generator=g)
    labels = torch.randint(0, 3, (50,), generator=g)
    loss = alignment_loss(z, labels, text, 1e-3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_gradient_flows_and_descent_separates_classes() -> None:
    torch.manual_seed(0)
    cfg = AlignmentConfig(in_dim=16, out_dim=8, heads=2, mlp_ratio=2.0)
    module = AlignmentModule(cfg)
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    protos = torch.randn(3, 16)
    labels = torch.randint(0, 3, (2, 20))
    feats = protos[labels] + 0.1 * torch.randn(2, 20, 16)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(60):
        z = module(feats)
        loss = module.loss(z.reshape(-1, 8), labels.reshape(-1), text, 0.1)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    pred = (module(feats) @ text.T).argmax(-1)
    assert (pred == labels).float().mean() == 1.0


def test_module_shapes_and_any_patch_count() -> None:
    module = AlignmentModule(AlignmentConfig(in_dim=12, out_dim=5, heads=3))
    assert module(torch.randn(2, 7, 12)).shape == (2, 7, 5)
    assert module(torch.randn(1, 16, 12)).shape == (1, 16, 5)
    with pytest.raises(ValueError, match=r"\(B, N, 12\)"):
        module(torch.randn(2, 7, 10))


def test_config_validation_and_roundtrip() -> None:
    cfg = AlignmentConfig(in_dim=32, out_dim=16, heads=4, mlp_ratio=2.5)
    assert AlignmentConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.hidden_dim == 80
    with pytest.raises(ValueError, match="not divisible by heads"):
        AlignmentConfig(in_dim=10, out_dim=4, heads=3)
    with pytest.raises(ValueError, match="unknown keys"):
        AlignmentConfig.from_dict({**cfg.to_dict(), "depth": 2})
    with pytest.raises(ValueError, match="out_dim"):
        AlignmentConfig(in_dim=8, out_dim=0)


def test_loss_input_errors() -> None:
    z = torch.randn(4, 3)
    text = torch.randn(2, 3)
    with pytest.raises(ValueError, match="no labelled patch"):
        alignment_loss(z, torch.full((4,), -1), text, 0.1)
    with pytest.raises(ValueError, match="out of range"):
        alignment_loss(z, torch.tensor([0, 1, 2, 0]), text, 0.1)
    with pytest.raises(ValueError, match="temperature"):
        alignment_loss(z, torch.tensor([0, 1, 1, 0]), text, 0.0)
    with pytest.raises(ValueError, match=r"text must be \(K, 3\)"):
        alignment_loss(z, torch.tensor([0, 1, 1, 0]), torch.randn(2, 4), 0.1)
    with pytest.raises(ValueError, match="negatives must be 'all' or 'batch', got 'some'"):
        alignment_loss(z, torch.tensor([0, 1, 1, 0]), text, 0.1, "some")  # type: ignore[arg-type]
