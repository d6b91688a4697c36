"""The SDD maths against independent, straightforward references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdd_search.sdd import cell_logits, complementary_mask, num_cells, sdd_loss, warmup_factor

torch.set_num_threads(2)


def _cells(batch=6, cells=21, classes=7, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, cells, classes, generator=generator) * scale
    teacher = torch.randn(batch, cells, classes, generator=generator) * scale
    target = torch.randint(0, classes, (batch,), generator=generator)
    # Make some teacher cells right and some wrong so both complementary kinds occur.
    teacher[0, :, target[0]] += 20.0  # global right, all cells right
    teacher[1, 0, target[1]] += 20.0  # global right, locals mostly wrong
    return student.double(), teacher.double(), target


def _loop_weight(teacher, target, b, n, complementary_weight):
    global_right = int(teacher[b, 0].argmax()) == int(target[b])
    local_right = int(teacher[b, n].argmax()) == int(target[b])
    return complementary_weight if global_right != local_right else 1.0


def _loop_kd(s, t, temperature):
    p_t = [math.exp(v / temperature) for v in t]
    z_t = sum(p_t)
    p_t = [v / z_t for v in p_t]
    log_z_s = math.log(sum(math.exp(v / temperature) for v in s))
    log_p_s = [v / temperature - log_z_s for v in s]
    return temperature**2 * sum(p * (math.log(p) - q) for p, q in zip(p_t, log_p_s, strict=True))


def _loop_dkd(s, t, y, temperature, alpha, beta):
    def softmax(v, skip=None):
        e = [math.exp(x / temperature) if i != skip else 0.0 for i, x in enumerate(v)]
        z = sum(e)
        return [x / z for x in e]

    ps, pt = softmax(s), softmax(t)
    bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
    tckd = sum(q * (math.log(q) - math.log(p)) for p, q in zip(bs, bt, strict=True))
    ns, nt = softmax(s, skip=y), softmax(t, skip=y)
    nckd = sum(
        q * (math.log(q) - math.log(p))
        for i, (p, q) in enumerate(zip(ns, nt, strict=True))
        if i != y
    )
    return temperature**2 * (alpha * tckd + beta * nckd)


def _loop_nkd(s, t, y, temperature, gamma):
    z_s = sum(math.exp(v) for v in s)
    z_t = sum(math.exp(v) for v in t)
    target_term = -(math.exp(t[y]) / z_t) * (s[y] - math.log(z_s))
    others = [i for i in range(len(s)) if i != y]
    zs = sum(math.exp(s[i] / temperature) for i in others)
    zt = sum(math.exp(t[i] / temperature) for i in others)
    non = -sum(
        (math.exp(t[i] / temperature) / zt) * (s[i] / temperature - math.log(zs)) for i in others
    )
    return target_term + gamma * temperature**2 * non


def _loop_sdd(student, teacher, target, base, temperature, complementary_weight, **knobs):
    batch, cells, _ = student.shape
    total = 0.0
    for b in range(batch):
        for n in range(cells):
            s, t, y = student[b, n].tolist(), teacher[b, n].tolist(), int(target[b])
            if base == "kd":
                value = _loop_kd(s, t, temperature)
            elif base == "dkd":
                value = _loop_dkd(s, t, y, temperature, knobs["dkd_alpha"], knobs["dkd_beta"])
            else:
                value = _loop_nkd(s, t, y, temperature, knobs["nkd_gamma"])
            total += _loop_weight(teacher, target, b, n, complementary_weight) * value
    return total / (batch * cells)


@pytest.mark.parametrize("base", ["kd", "dkd", "nkd"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_sdd_loss_matches_straightforward_loop(base, temperature):
    student, teacher, target = _cells()
    knobs = {"dkd_alpha": 1.0, "dkd_beta": 8.0, "nkd_gamma": 1.5}
    expected = _loop_sdd(student, teacher, target, base, temperature, 2.0, **knobs)
    got = sdd_loss(
        student.float(), teacher.float(), target, base=base, temperature=temperature, **knobs
    )
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def _official_sdd_kd(out_s_multi, out_t_multi, target, temperature):
    """The official SDD code's sdd_kd_loss (B x K x N inputs), transcribed without .cuda()."""
    out_s_multi = out_s_multi.permute(2, 0, 1)
    out_t_multi = out_t_multi.permute(2, 0, 1)
    out_t = out_t_multi.reshape(out_t_multi.shape[0] * out_t_multi.shape[1], out_t_multi.shape[2])
    out_s = out_s_multi.reshape(out_s_multi.shape[0] * out_s_multi.shape[1], out_s_multi.shape[2])
    target_r = target.repeat(out_t_multi.shape[0])
    p_s = F.log_softmax(out_s / temperature, dim=1)
    p_t = F.softmax(out_t / temperature, dim=1)
    loss_kd = F.kl_div(p_s, p_t, reduction="none") * temperature**2
    out_t_predict = torch.argmax(out_t, dim=1)
    mask_true = out_t_predict == target_r
    mask_false = out_t_predict != target_r
    global_prediction = out_t_predict[0 : len(target)]
    global_true = (global_prediction == target).repeat(out_t_multi.shape[0])
    global_false = (global_prediction != target).repeat(out_t_multi.shape[0])
    mask_false[global_false] = False
    mask_false[0 : len(target)] = False
    gt_lw = mask_false
    mask_true[global_true] = False
    mask_true[0 : len(target)] = False
    gw_lt = mask_true
    index = torch.ones_like(out_t_predict).float()
    index[gw_lt] = 2.0
    index[gt_lw] = 2.0
    loss = torch.sum(loss_kd, dim=1)
    return torch.sum(loss * index) / target_r.shape[0]


def test_sdd_kd_matches_official_implementation():
    student, teacher, target = _cells(batch=8, cells=5, classes=10, seed=3)
    official = _official_sdd_kd(student.permute(0, 2, 1), teacher.permute(0, 2, 1), target, 4.0)
    ours = sdd_loss(student.float(), teacher.float(), target, base="kd", temperature=4.0)
    assert ours.item() == pytest.approx(official.item(), rel=1e-5)


@pytest.mark.parametrize("base", ["kd", "dkd", "nkd"])
def test_single_cell_is_the_plain_base_loss(base):
    student, teacher, target = _cells(cells=1)
    student, teacher = student.float(), teacher.float()
    got = sdd_loss(student, teacher, target, base=base, complementary_weight=5.0)
    if base == "kd":
        plain = (
            F.kl_div(
                F.log_softmax(student[:, 0] / 4, 1),
                F.softmax(teacher[:, 0] / 4, 1),
                reduction="batchmean",
            )
            * 16
        )
        assert got.item() == pytest.approx(plain.item(), rel=1e-5)
    else:
        expected = _loop_sdd(
            student.double(),
            teacher.double(),
            target,
            base,
            4.0,
            5.0,
            dkd_alpha=1.0,
            dkd_beta=8.0,
            nkd_gamma=1.5,
        )
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_complementary_mask_semantics():
    target = torch.tensor([0, 0])
    teacher = torch.zeros(2, 3, 2)
    teacher[0, 0, 0] = teacher[0, 1, 1] = teacher[0, 2, 0] = 1  # global right; cell 1 wrong
    teacher[1, 0, 1] = teacher[1, 1, 0] = teacher[1, 2, 1] = 1  # global wrong; cell 1 right
    mask = complementary_mask(teacher, target)
    assert mask.tolist() == [[False, True, False], [False, True, False]]


def test_cell_logits_order_and_linearity():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 8, 8, generator=generator)
    head = torch.nn.Linear(5, 3)
    cells = cell_logits(features, head, (1, 2, 4))
    assert cells.shape == (2, num_cells((1, 2, 4)), 3) == (2, 21, 3)
    torch.testing.assert_close(cells[:, 0], head(features.mean((2, 3))))
    # Cell 1 is the top-left 2x2 cell, cell 2 top-right (row-major), cell 5 the first 4x4 cell.
    torch.testing.assert_close(cells[:, 1], head(features[:, :, :4, :4].mean((2, 3))))
    torch.testing.assert_close(cells[:, 2], head(features[:, :, :4, 4:].mean((2, 3))))
    torch.testing.assert_close(cells[:, 5], head(features[:, :, :2, :2].mean((2, 3))))
    # Pool-then-project equals project-then-pool (class activation map) for a linear head.
    cam = torch.einsum("bchw,kc->bkhw", features, head.weight) + head.bias[:, None, None]
    torch.testing.assert_close(
        cells[:, 5:].transpose(1, 2), F.adaptive_avg_pool2d(cam, 4).flatten(2)
    )


def test_cell_logits_on_7x7_uses_adaptive_regions():
    features = torch.randn(1, 4, 7, 7)
    head = torch.nn.Linear(4, 2)
    cells = cell_logits(features, head, (1, 2))
    torch.testing.assert_close(cells[:, 1], head(features[:, :, :4, :4].mean((2, 3))))  # 0..3
    torch.testing.assert_close(cells[:, 4], head(features[:, :, 3:, 3:].mean((2, 3))))  # 3..6


def test_gradients_flow_only_to_the_student():
    student, teacher, target = _cells()
    student = student.float().requires_grad_(True)
    teacher = teacher.float().requires_grad_(True)
    for base in ("kd", "dkd", "nkd"):
        loss = sdd_loss(student, teacher, target, base=base)
        loss.backward()
        assert student.grad is not None and torch.isfinite(student.grad).all()
        assert teacher.grad is None


def test_bf16_inputs_reduce_in_float32():
    student, teacher, target = _cells()
    full = sdd_loss(student.float(), teacher.float(), target, base="dkd")
    half = sdd_loss(student.bfloat16(), teacher.bfloat16(), target, base="dkd")
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=3e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = torch.randn(4, 8, 4, 4)
        cells = cell_logits(features, torch.nn.Linear(8, 5), (1, 2))
        loss = sdd_loss(cells, cells.detach() + 0.1, torch.zeros(4, dtype=torch.long))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_large_logits_stay_finite():
    student, teacher, target = _cells(scale=300.0)
    for base in ("kd", "dkd", "nkd"):
        assert torch.isfinite(sdd_loss(student.float(), teacher.float(), target, base=base))


def test_identical_logits_give_zero_kd():
    _, teacher, target = _cells()
    assert sdd_loss(teacher.float(), teacher.float(), target, base="kd").item() == pytest.approx(
        0, abs=1e-6
    )
    assert sdd_loss(teacher.float(), teacher.float(), target, base="dkd").item() == pytest.approx(
        0, abs=1e-5
    )


def test_warmup_factor():
    assert warmup_factor(1, 0) == 1.0
    assert warmup_factor(1, 20) == pytest.approx(0.05)
    assert warmup_factor(20, 20) == 1.0
    assert warmup_factor(40, 20) == 1.0


def test_bad_shapes_and_base_are_clear_errors():
    student, teacher, target = _cells()
    with pytest.raises(ValueError, match="B x N x K"):
        sdd_loss(student[:, :3], teacher, target)
    with pytest.raises(ValueError, match="not one of"):
        sdd_loss(student, teacher, target, base="fitnet")
