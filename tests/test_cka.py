"""Linear CKA against float64 textbook formulas, its invariances, its gradients and its degenerate
cases."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import unchecked
from hypothesis import given, settings
from hypothesis import strategies as st

from cdist.cka import hsic, linear_cka


def textbook_cka(x, y):
    """SPEC 1.4 literally, in float64: K = XX^T, L = YY^T, H = I - 11^T/m,
    HSIC = tr(KHLH)/(m-1)^2."""
    x, y = x.double(), y.double()
    m = x.shape[0]
    h = torch.eye(m, dtype=torch.float64) - torch.ones(m, m, dtype=torch.float64) / m

    def hs(k, l):  # noqa: E741
        return torch.trace(k @ h @ l @ h) / (m - 1) ** 2

    k, l = x @ x.T, y @ y.T  # noqa: E741
    return hs(k, l) / torch.sqrt(hs(k, k) * hs(l, l))


def u_statistic_hsic(k, l):  # noqa: E741
    """Song et al.'s unbiased HSIC as the U-statistic it is: means over tuples of distinct
    indices."""
    m = k.shape[0]
    idx = range(m)
    pairs = [(i, j) for i, j in itertools.permutations(idx, 2)]
    e_kl = sum(k[i, j] * l[i, j] for i, j in pairs) / len(pairs)
    e_k = sum(k[i, j] for i, j in pairs) / len(pairs)
    e_l = sum(l[i, j] for i, j in pairs) / len(pairs)
    triples = list(itertools.permutations(idx, 3))
    e_kl3 = sum(k[i, j] * l[i, q] for i, j, q in triples) / len(triples)
    quads = list(itertools.permutations(idx, 4))
    e_kl4 = sum(k[i, j] * l[q, r] for i, j, q, r in quads) / len(quads)
    return e_kl + e_kl4 - 2 * e_kl3, (e_k, e_l)


def test_matches_the_float64_textbook_formula():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 16, generator=g), torch.randn(32, 24, generator=g)
    y[:, :8] += 0.7 * x[:, :8]  # partly related, so the value is neither ~0 nor ~1
    ours = linear_cka(x, y)
    assert ours.dtype == torch.float32
    assert float(ours) == pytest.approx(float(textbook_cka(x, y)), abs=1e-6)
    assert 0.1 < float(ours) < 0.9


def test_debiased_hsic_is_the_u_statistic():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 5, generator=g, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T  # noqa: E741
    want, _ = u_statistic_hsic(k, l)
    assert float(hsic(k, l, debiased=True)) == pytest.approx(float(want), rel=1e-9, abs=1e-12)


def test_debiased_removes_the_small_batch_bias():
    g = torch.Generator().manual_seed(2)
    biased, debiased = [], []
    for _ in range(20):
        x, y = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)  # unrelated
        biased.append(float(linear_cka(x, y)))
        debiased.append(float(linear_cka(x, y, debiased=True)))
    assert sum(biased) / 20 > 0.25  # SPEC: about 0.2 or more for unrelated data at m = 32
    assert abs(sum(debiased) / 20) < 0.05


def test_invariant_to_orthogonal_maps_and_isotropic_scaling():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 12, generator=g), torch.randn(40, 20, generator=g)
    y = y + x @ torch.randn(12, 20, generator=g)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    for debiased in (False, True):
        base = float(linear_cka(x, y, debiased=debiased))
        assert float(linear_cka(x @ q, y, debiased=debiased)) == pytest.approx(base, abs=1e-5)
        scaled = float(linear_cka(3.7 * x, 0.01 * y, debiased=debiased))
        assert scaled == pytest.approx(base, abs=1e-5)
        shifted = float(linear_cka(x + 5.0, y, debiased=debiased))
        assert shifted == pytest.approx(base, abs=1e-4)  # centring
    assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-6)


def test_low_precision_inputs_give_float32_values():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g) + 0.5
    ours = linear_cka(x.bfloat16(), y.bfloat16())
    assert ours.dtype == torch.float32
    want = textbook_cka(x.bfloat16().float(), y.bfloat16().float())
    assert float(ours) == pytest.approx(float(want), abs=1e-5)


def test_gradient_reaches_both_sides_and_the_student_parameters():
    """A public re-implementation detached the student side and trained nothing; here both sides
    learn."""
    g = torch.Generator().manual_seed(5)
    student = torch.nn.Linear(10, 6)
    inputs = torch.randn(16, 10, generator=g)
    teacher = torch.randn(16, 4, generator=g, requires_grad=True)
    loss = 1 - linear_cka(student(inputs), teacher)
    loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0
    before = float(loss.detach())
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        (1 - linear_cka(student(inputs), teacher.detach())).backward()
        opt.step()
    assert float((1 - linear_cka(student(inputs), teacher)).detach()) < before


@pytest.mark.parametrize("debiased", [False, True])
def test_degenerate_inputs_give_zero_with_finite_gradients(debiased):
    g = torch.Generator().manual_seed(6)
    y = torch.randn(8, 5, generator=g)
    for x in (torch.zeros(8, 3), torch.full((8, 3), 0.1),
              torch.ones(8, 1) * torch.randn(1, 3, generator=g)):
        x = x.clone().requires_grad_(True)
        value = linear_cka(x, y, debiased=debiased)
        value.backward()
        assert float(value.detach()) == 0.0 and torch.isfinite(x.grad).all()
    one = torch.randn(1, 3, requires_grad=True)
    assert float(linear_cka(one, torch.randn(1, 2)).detach()) == 0.0


def test_errors_are_one_line_and_name_the_fix():
    for m in (1, 2, 3):
        with pytest.raises(ValueError, match="at least 4 examples"):
            linear_cka(torch.randn(m, 2), torch.randn(m, 2), debiased=True)
    with pytest.raises(ValueError, match="no examples"):
        linear_cka(torch.zeros(0, 3), torch.zeros(0, 2))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(8, 3)
        x[2, 1] = bad
        for args in ((x, torch.randn(8, 2)), (torch.randn(8, 2), x)):
            with pytest.raises(ValueError, match="NaN or inf"):
                linear_cka(*args)
    # Wrong shapes break the signature, which the suite's checker would report first.
    with unchecked(), pytest.raises(ValueError, match="same examples"):
        linear_cka(torch.randn(5, 2), torch.randn(6, 2))
    with unchecked(), pytest.raises(ValueError, match="flatten"):
        linear_cka(torch.randn(5, 2, 2), torch.randn(5, 2))


finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_fuzz_never_nan_or_inf(data):
    m = data.draw(st.integers(1, 12))
    p1, p2 = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    x = torch.tensor(data.draw(st.lists(finite, min_size=m * p1, max_size=m * p1))).reshape(m, p1)
    y = torch.tensor(data.draw(st.lists(finite, min_size=m * p2, max_size=m * p2))).reshape(m, p2)
    x.requires_grad_(True)
    for debiased in (False, True):
        if debiased and m < 4:
            continue
        value = linear_cka(x, y, debiased=debiased)
        assert torch.isfinite(value.detach())
        if not debiased:
            assert -1e-4 <= float(value.detach()) <= 1 + 1e-4
        (grad,) = torch.autograd.grad(value, x)
        assert torch.isfinite(grad).all()


def reference_cka(x, y):
    """The textbook CKA in float64 on the very values given (their own dtype's rounding
    included), with each feature centred first (the same as H K H for a linear kernel, without
    cancelling a large offset inside K); 0 when a side does not vary."""
    x, y = x.double(), y.double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    if not xc.abs().sum() or not yc.abs().sum():
        return 0.0
    return float(textbook_cka(xc, yc))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_exact_from_1e_minus_30_to_1e30_with_offsets_and_low_precision(data):
    """Each side at its own scale and offset, in float32, bf16 or fp16 (fp16 where its range holds
    the values), against the float64 reference on the same rounded values; gradients finite."""
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    # fp16 holds magnitudes up to 65504 only
    span, offsets = ((-3, 2), [0.0, 1.0, 10.0]) if dtype == torch.float16 else ((-30, 30),
                                                                                [0.0, 1.0, 1e3])
    m = data.draw(st.integers(4, 24))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, 6, generator=g, dtype=torch.float64)
    sides = []
    for width, part in ((5, z[:, :5]), (3, z[:, 3:])):  # y shares a column-block with x
        scale = 10.0 ** data.draw(st.integers(*span))
        offset = data.draw(st.sampled_from(offsets))
        side = part + 0.3 * torch.randn(m, width, generator=g, dtype=torch.float64)
        sides.append((scale * (side + offset)).to(dtype).float().to(dtype))
    x, y = sides
    want = reference_cka(x, y)
    for debiased in (False, True):
        xg = x.clone().requires_grad_(True)
        value = linear_cka(xg, y, debiased=debiased)
        assert value.dtype == torch.float32 and torch.isfinite(value.detach())
        if not debiased:
            assert float(value.detach()) == pytest.approx(want, abs=1e-5)
        (grad,) = torch.autograd.grad(value, xg)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("scale", [1e-30, 1e-11, 1e-7, 1e-6, 1e5, 1e8, 1e9, 1e20, 1e30])
def test_the_scales_that_used_to_break_it(scale):
    """Both sides, or one side alone, at scales where the float32 products over- or underflowed
    (inf, 0, NaN, or NaN gradients before); a large common offset is not mistaken for a
    constant."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)
    y[:, :4] += x[:, :4]
    want = reference_cka(x, y)
    for a, b in ((scale * x, scale * y), (scale * x, y)):
        a.requires_grad_(True)
        value = linear_cka(a, b)
        (grad,) = torch.autograd.grad(value, a)
        assert float(value.detach()) == pytest.approx(want, abs=1e-5)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    z = torch.randn(32, 8, generator=g)
    offset = float(linear_cka(1000 + 1e-3 * z, z))
    assert offset == pytest.approx(reference_cka(1000 + 1e-3 * z, z), abs=1e-6)
    assert offset > 0.99
