"""The fused C++ scan against the pure-PyTorch loop reference (skipped where it cannot be built)."""
import pytest
import torch

from vmamba import cross_merge, cross_scan
from vmamba.cross_scan import scan_indices
from vmamba.ops import fused
from vmamba.ops.selective_scan import selective_scan_ref
from tests.conftest import needs_fused_kernel

pytestmark = needs_fused_kernel(fused.FusedKernel.MULTI_SCAN)


def _inputs(batch, dim, d_state, length, groups, dtype=torch.float32):
    g = torch.Generator().manual_seed(batch * 1000 + dim * 10 + length)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    bc_shape = (batch, d_state, length) if groups is None else (batch, groups, d_state, length)
    return dict(
        u=r(batch, dim, length), delta=r(batch, dim, length), A=-torch.rand(dim, d_state, generator=g, dtype=dtype) * 2,
        B=r(*bc_shape), C=r(*bc_shape), D=r(dim), z=r(batch, dim, length), delta_bias=r(dim),
        initial_state=r(batch, dim, d_state),
    )


@pytest.mark.parametrize(
    "batch, dim, d_state, length, groups",
    [(2, 16, 16, 37, None), (1, 8, 1, 1, None), (2, 12, 16, 13, 4), (2, 6, 3, 5, None), (1, 40, 1, 64, 2),
     (3, 24, 4, 70, 3), (1, 20, 1, 150, None), (2, 18, 16, 130, 2), (1, 33, 2, 65, None)],
)
@pytest.mark.parametrize("softplus", [True, False])
def test_fused_matches_reference(batch, dim, d_state, length, groups, softplus):
    inputs = _inputs(batch, dim, d_state, length, groups)
    if not softplus:  # positive step sizes, as softplus would give
        inputs["delta"] = inputs["delta"].abs()
        inputs["delta_bias"] = inputs["delta_bias"].abs()
    ref_in = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    fus_in = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out_r, last_r = selective_scan_ref(**ref_in, delta_softplus=softplus, return_last_state=True)
    out_f, last_f = fused.fused_selective_scan(**fus_in, delta_softplus=softplus, return_last_state=True)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_f, last_r, rtol=1e-5, atol=1e-5)
    w, w_last = torch.randn_like(out_r), torch.randn_like(last_r)
    ((out_r * w).sum() + (last_r * w_last).sum()).backward()
    ((out_f * w).sum() + (last_f * w_last).sum()).backward()
    for name in inputs:
        ref_grad, fus_grad = ref_in[name].grad, fus_in[name].grad
        scale = ref_grad.abs().max().clamp_min(1.0)
        torch.testing.assert_close(fus_grad / scale, ref_grad / scale, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("present", [(), ("D",), ("z",), ("delta_bias",), ("initial_state",), ("D", "z")])
@pytest.mark.parametrize("d_state", [1, 16])
def test_fused_optional_inputs(present, d_state):
    """Each optional input on its own (and none): outputs, last state and gradients match the loop."""
    inputs = _inputs(2, 21, d_state, 80, None)
    names = ("u", "delta", "A", "B", "C", *present)
    ref_in = {k: inputs[k].clone().requires_grad_() for k in names}
    fus_in = {k: inputs[k].clone().requires_grad_() for k in names}
    out_r, last_r = selective_scan_ref(**ref_in, delta_softplus=True, return_last_state=True)
    out_f, last_f = fused.fused_selective_scan(**fus_in, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_f, last_r, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(out_r)
    grads_r = torch.autograd.grad((out_r * w).sum(), list(ref_in.values()))
    grads_f = torch.autograd.grad((out_f * w).sum(), list(fus_in.values()))
    for name, gr, gf in zip(names, grads_r, grads_f):
        scale = gr.abs().max().clamp_min(1.0)
        torch.testing.assert_close(gf / scale, gr / scale, rtol=1e-5, atol=1e-5, msg=name)


def test_fused_softplus_extremes():
    """Step sizes from very negative to very positive raw deltas (softplus and its derivative at both ends)."""
    inputs = _inputs(1, 16, 4, 50, None)
    inputs["delta"] = torch.linspace(-30.0, 30.0, 16 * 50).view(1, 16, 50)
    inputs["A"] = -torch.rand(16, 4) * 0.05  # weak decay, so large steps keep the state finite
    ref_in = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    fus_in = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out_r = selective_scan_ref(**ref_in, delta_softplus=True)
    out_f = fused.fused_selective_scan(**fus_in, delta_softplus=True)
    scale = out_r.abs().max()
    torch.testing.assert_close(out_f / scale, out_r / scale, rtol=1e-5, atol=1e-5)
    out_r.sum().backward()
    out_f.sum().backward()
    for name in ("delta", "u", "A"):
        gr, gf = ref_in[name].grad, fus_in[name].grad
        g_scale = gr.abs().max().clamp_min(1.0)
        torch.testing.assert_close(gf / g_scale, gr / g_scale, rtol=1e-5, atol=1e-5, msg=name)


def test_fused_half_inputs_run_in_float32():
    inputs = _inputs(1, 16, 4, 20, None)
    out_f = fused.fused_selective_scan(**{k: v.bfloat16() for k, v in inputs.items()}, delta_softplus=True)
    out_r = selective_scan_ref(**{k: v.bfloat16().float() for k, v in inputs.items()}, delta_softplus=True)
    assert out_f.dtype == torch.bfloat16
    torch.testing.assert_close(out_f.float(), out_r, rtol=1e-2, atol=1e-2)


def test_fused_rejects_groups_that_do_not_divide_channels():
    inputs = _inputs(1, 10, 2, 5, 3)
    with pytest.raises(ValueError, match="groups"):
        fused.fused_selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])


@pytest.mark.parametrize("pattern, spatial", [("cross2d", (5, 7)), ("cross2d", (1, 4)), ("bi1d", (11,)), ("cross3d", (2, 3, 4))])
@pytest.mark.parametrize("d_state", [1, 16])
def test_fused_multi_direction_equals_scan_per_direction_then_merge(pattern, spatial, d_state):
    """One in-place pass over the map equals cross_scan -> per-direction scans -> cross_merge."""
    g = torch.Generator().manual_seed(7)
    batch, dim = 2, 16
    index = scan_indices(spatial, pattern)
    k, length = index.shape
    x = torch.randn(batch, *spatial, dim, generator=g, requires_grad=True)
    delta = torch.randn(batch, length, k, dim, generator=g, requires_grad=True)  # map-row order
    A = (-torch.rand(k, d_state, dim, generator=g) - 0.1).requires_grad_()
    Bm = torch.randn(batch, length, k, 1, d_state, generator=g, requires_grad=True)
    Cm = torch.randn(batch, length, k, 1, d_state, generator=g, requires_grad=True)
    bias = torch.randn(k, dim, generator=g, requires_grad=True)

    y_f, last_f = fused.fused_multi_scan(x.reshape(batch, length, dim), delta, A, Bm, Cm, index, delta_bias=bias)

    # Reference: gather each direction's sequence, scan it with the loop, merge back.
    seqs = cross_scan(x, pattern, channels_last=True)  # (B, K, L, C)
    delta_seq = torch.stack([delta[:, index[j], j] for j in range(k)], 1)  # (B, K, L, C)
    B_seq = torch.stack([Bm[:, index[j], j, 0] for j in range(k)], 1)  # (B, K, L, N)
    C_seq = torch.stack([Cm[:, index[j], j, 0] for j in range(k)], 1)
    out, last = selective_scan_ref(
        seqs.transpose(2, 3).reshape(batch, k * dim, length),
        delta_seq.transpose(2, 3).reshape(batch, k * dim, length),
        A.transpose(1, 2).reshape(k * dim, d_state),
        B_seq.transpose(2, 3), C_seq.transpose(2, 3),
        delta_bias=bias.reshape(-1), delta_softplus=True, return_last_state=True,
    )
    y_r = cross_merge(out.view(batch, k, dim, length).transpose(2, 3), spatial, pattern, channels_last=True)
    torch.testing.assert_close(y_f.view_as(y_r), y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_f, last.view(batch, k, dim, d_state).transpose(2, 3), rtol=1e-5, atol=1e-5)
    w = torch.randn_like(y_r)
    grads_r = torch.autograd.grad((y_r * w).sum(), (x, delta, A, Bm, Cm, bias))
    grads_f = torch.autograd.grad((y_f.view_as(y_r) * w).sum(), (x, delta, A, Bm, Cm, bias))
    for name, gr, gf in zip(("x", "delta", "A", "B", "C", "bias"), grads_r, grads_f):
        scale = gr.abs().max().clamp_min(1.0)
        torch.testing.assert_close(gf / scale, gr / scale, rtol=1e-5, atol=1e-5, msg=name)


def test_backend_selection(monkeypatch):
    monkeypatch.setenv("VMAMBA_SCAN_BACKEND", "torch")
    with fused.forced_scan_backend("fused"):
        assert fused.scan_backend() is fused.ScanBackend.FUSED
    assert fused.scan_backend() is fused.ScanBackend.TORCH  # restored to the environment's choice
    assert not fused.use_fused(torch.zeros(1))
    assert "pure PyTorch" in fused.fused_status()
    monkeypatch.setenv("VMAMBA_SCAN_BACKEND", "fused")
    assert fused.use_fused(torch.zeros(1))
    monkeypatch.setenv("VMAMBA_SCAN_BACKEND", "sometimes")
    with pytest.raises(ValueError, match="VMAMBA_SCAN_BACKEND"):
        fused.scan_backend()
    fused.set_scan_backend("torch")
    try:
        assert fused.scan_backend() is fused.ScanBackend.TORCH
    finally:
        fused.set_scan_backend(None)


def test_selective_scan_dispatches_to_the_fused_kernel_with_the_same_numbers():
    """``vmamba.ops.selective_scan`` picks the compiled kernel under the fused backend; both paths agree."""
    from torch.utils.flop_counter import FlopCounterMode

    from vmamba.ops import selective_scan

    inputs = _inputs(2, 24, 16, 45, 3)
    results = {}
    for backend in (fused.ScanBackend.TORCH, fused.ScanBackend.FUSED):
        fused.set_scan_backend(backend)
        try:
            leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
            with FlopCounterMode(display=False) as counter:
                out, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True)
                (out.square().sum() + last.sum()).backward()
            results[backend] = (out, last, {k: v.grad for k, v in leaves.items()}, counter.get_total_flops())
        finally:
            fused.set_scan_backend(None)
    (o_t, l_t, g_t, f_t), (o_f, l_f, g_f, f_f) = results.values()
    torch.testing.assert_close(o_f, o_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_f, l_t, rtol=1e-5, atol=1e-5)
    for name in g_t:
        scale = g_t[name].abs().max().clamp_min(1.0)
        torch.testing.assert_close(g_f[name] / scale, g_t[name] / scale, rtol=1e-5, atol=1e-5, msg=name)
    assert f_t == f_f > 0  # the op is counted the same whichever kernel runs inside


def test_fused_multi_scan_is_flop_counted():
    from vmamba.ops.flops import count_flops

    index = scan_indices((4, 6), "cross2d")
    k, length = index.shape
    u = torch.randn(2, length, 16)
    delta, A = torch.randn(2, length, k, 16), -torch.rand(k, 3, 16)
    Bm = Cm = torch.randn(2, length, k, 1, 3)
    flops = count_flops(lambda: fused.fused_multi_scan(u, delta, A, Bm, Cm, index))
    assert flops == 2 * 9 * 2 * length * k * 16 * 3


@pytest.mark.parametrize("d_state", [1, 5])
def test_fused_backward_with_and_without_forward_checkpoints(d_state):
    """The backward restarts from the forward's kept states, or recomputes them: same gradients."""
    inputs = _inputs(2, 20, d_state, 150, None)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    args = [inputs[k] for k in names]
    out, last, marks = fused.fused_selective_scan_forward(*args, True, True)
    assert marks.shape == fused.selective_checkpoints_shape(inputs["u"], inputs["A"], inputs["B"])
    g, g_last = torch.randn_like(out), torch.randn_like(last)
    with_marks = fused.fused_selective_scan_backward(g, g_last, *args, True, marks)
    without = fused.fused_selective_scan_backward(g, g_last, *args, True)
    for name, a, b in zip(names, with_marks, without):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_fused_op_registration():
    inputs = _inputs(1, 18, 3, 70, None)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    args = [inputs[k].clone().requires_grad_() for k in names]
    for keep in (True, False):
        torch.library.opcheck(torch.ops.vmamba.fused_selective_scan.default, args + [True, keep])


@pytest.mark.parametrize("kernel", list(fused.loader.FusedKernel))
def test_kernels_share_pytorchs_thread_pool(kernel):
    """at::parallel_for in the kernels runs on torch.get_num_threads() threads (it silently runs on one
    when the extension is built without OpenMP), and never on more."""
    try:
        module = fused.loader.load(kernel)
    except fused.FusedUnavailable as err:  # pragma: no cover - depends on the machine
        pytest.skip(f"{kernel.value} cannot be built here: {err}")
    if kernel in fused.loader._single_threaded:  # pragma: no cover - a compiler without OpenMP
        pytest.skip(f"{kernel.value} was built without OpenMP")
    threads = torch.get_num_threads()
    try:
        for n in sorted({1, min(2, threads), threads}):
            torch.set_num_threads(n)
            assert module.parallel_workers(64) == n
            assert module.parallel_workers(1) == 1
    finally:
        torch.set_num_threads(threads)


def test_backward_as_the_first_parallel_region_of_a_process():
    """The per-thread dB / dC slots must not depend on what OpenMP reports inside the parallel region (a
    fresh process whose first parallel region is the kernel's backward once failed with 'unexpected thread
    id')."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from vmamba.ops.fused.loader import load\n"
        "k = load(); B, L, K, D, N = 2, 70, 2, 32, 1\n"
        "e = torch.empty(0); idx = torch.stack([torch.arange(L), torch.arange(L).flip(0)])\n"
        "g = k.backward(torch.randn(B, L, 1, D), torch.randn(B, L, K, D), -torch.rand(K, N, D),\n"
        "               torch.randn(B, L, K, 1, N), torch.randn(B, L, K, 1, N), e, e, idx, True,\n"
        "               torch.randn(B, L, D), e)\n"
        "assert all(torch.isfinite(t).all() for t in g if t is not None and t.numel())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def _map_inputs(batch, spatial, dim, d_state, groups=1, per_direction_u=False):
    g = torch.Generator().manual_seed(11)
    index = scan_indices(spatial, "cross2d")
    k, length = index.shape
    return dict(
        u=torch.randn(batch, length, k if per_direction_u else 1, dim, generator=g),
        delta=torch.randn(batch, length, k, dim, generator=g),
        A=-torch.rand(k, d_state, dim, generator=g) - 0.1,
        Bm=torch.randn(batch, length, k, groups, d_state, generator=g),
        Cm=torch.randn(batch, length, k, groups, d_state, generator=g),
        bias=torch.randn(k, dim, generator=g),
        h0=torch.randn(batch, k, d_state, dim, generator=g),
        index=index,
    )


@pytest.mark.parametrize("spatial, d_state, groups, per_direction_u", [((9, 15), 1, 1, False), ((1, 1), 1, 1, False),
                                                                       ((13, 11), 16, 2, True), ((8, 16), 3, 1, False)])
def test_fused_multi_backward_with_and_without_forward_checkpoints(spatial, d_state, groups, per_direction_u):
    """The map-layout backward restarts from the forward's kept states (one per tile and direction), or
    recomputes them with a forward sweep: the same gradients, and the same bias gradient as summing
    d delta (the kernel reduces it per batch item and direction itself)."""
    ext = fused.loader.load()
    dim = 2 * ext.lanes
    x = _map_inputs(2, spatial, dim, d_state, groups, per_direction_u)
    args = [x[name] for name in ("u", "delta", "A", "Bm", "Cm", "bias", "h0", "index")]
    y, last, marks = ext.forward(*args, True, True)
    y_plain, last_plain, no_marks = ext.forward(*args, True)
    assert no_marks.numel() == 0
    from vmamba.ops.fused.multi_scan import multi_checkpoints_shape

    assert tuple(marks.shape) == multi_checkpoints_shape(x["u"], x["delta"], x["A"])
    torch.testing.assert_close(y, y_plain, rtol=0, atol=0)
    torch.testing.assert_close(last, last_plain, rtol=0, atol=0)
    dy, dlast = torch.randn_like(y), torch.randn_like(last)
    with_marks = ext.backward(*args, True, dy, dlast, marks)
    without = ext.backward(*args, True, dy, dlast)
    names = ("u", "delta", "A", "B", "C", "bias", "h0")
    for name, a, b in zip(names, with_marks, without):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    dbias = with_marks[5]  # (B, K, D)
    torch.testing.assert_close(dbias.sum(0), with_marks[1].sum((0, 1)), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="checkpoints"):
        ext.backward(*args, True, dy, dlast, marks[:1])


def _assert_close_with_grads(outs_fused, outs_ref, leaves_fused, leaves_ref):
    """Outputs within 1e-5, and the gradients of every leaf (by name) of one random weighting of them, each
    relative to the reference gradient's largest entry."""
    for a, b in zip(outs_fused, outs_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    weights = [torch.randn_like(b) for b in outs_ref]
    loss = lambda outs: sum((o * w).sum() for o, w in zip(outs, weights))  # noqa: E731
    grads_f = torch.autograd.grad(loss(outs_fused), list(leaves_fused.values()))
    grads_r = torch.autograd.grad(loss(outs_ref), list(leaves_ref.values()))
    for name, gf, gr in zip(leaves_ref, grads_f, grads_r):
        scale = gr.abs().max().clamp_min(1.0)
        torch.testing.assert_close(gf / scale, gr / scale, rtol=1e-5, atol=1e-5, msg=name)


def _map_scan_reference(u, delta, A, Bm, Cm, index, bias, h0, D=None):
    """The map-layout scan from per-direction loop scans (:func:`selective_scan_ref`) merged by summation:
    ``u (B, L, D)`` or ``(B, L, K, D)``, ``delta (B, L, K, D)``, ``A (K, N, D)``, ``Bm, Cm (B, L, K, G, N)``,
    ``bias (K, D)``, ``h0 (B, K, N, D)``, ``D (K, D)`` -> ``y (B, L, D)``, ``last (B, K, N, D)``."""
    batch, length, k, dim = delta.shape
    groups, d_state = Bm.shape[3:]
    u_dir = u if u.dim() == 4 else u.unsqueeze(2).expand(-1, -1, k, -1)
    seq = lambda t: torch.stack([t[:, index[j], j] for j in range(k)], 1)  # noqa: E731  (B, K, L, ...) scan order
    to_bdl = lambda t: t.permute(0, 1, 3, 2).reshape(batch, k * dim, length)  # noqa: E731
    to_groups = lambda t: t.permute(0, 1, 3, 4, 2).reshape(batch, k * groups, d_state, length)  # noqa: E731
    out, last = selective_scan_ref(
        to_bdl(seq(u_dir)), to_bdl(seq(delta)), A.transpose(1, 2).reshape(k * dim, d_state), to_groups(seq(Bm)),
        to_groups(seq(Cm)), D=None if D is None else D.reshape(-1), delta_bias=bias.reshape(-1), delta_softplus=True,
        return_last_state=True, initial_state=h0.transpose(2, 3).reshape(batch, k * dim, d_state),
    )
    out = out.view(batch, k, dim, length).transpose(2, 3)  # (B, K, L, D) in scan order
    y = torch.zeros(batch, length, dim, dtype=out.dtype).index_add(1, index.reshape(-1), out.reshape(batch, k * length, dim))
    return y, last.view(batch, k, dim, d_state).transpose(2, 3)


@pytest.mark.parametrize("spatial, d_state", [((5, 7), 1), ((3, 4), 16), ((1, 1), 2)])
def test_fused_multi_scan_gradients_with_initial_state_and_last_state(spatial, d_state):
    """fused_multi_scan with an initial state, a loss on the last state and non-multiple-of-lanes channels
    (zero-padded): outputs and every gradient (bias included) match per-direction loop scans."""
    g = torch.Generator().manual_seed(5)
    batch, dim = 2, 11
    index = scan_indices(spatial, "cross2d")
    k, length = index.shape
    leaves = dict(
        u=torch.randn(batch, length, dim, generator=g), delta=torch.randn(batch, length, k, dim, generator=g),
        A=-torch.rand(k, d_state, dim, generator=g) - 0.1, B=torch.randn(batch, length, k, 1, d_state, generator=g),
        C=torch.randn(batch, length, k, 1, d_state, generator=g), bias=torch.randn(k, dim, generator=g),
        h0=torch.randn(batch, k, d_state, dim, generator=g),
    )
    fus = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    ref = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    y_f, last_f = fused.fused_multi_scan(
        fus["u"], fus["delta"], fus["A"], fus["B"], fus["C"], index, delta_bias=fus["bias"], initial_state=fus["h0"]
    )
    y_r, last_r = _map_scan_reference(ref["u"], ref["delta"], ref["A"], ref["B"], ref["C"], index, ref["bias"], ref["h0"])
    _assert_close_with_grads((y_f, last_f), (y_r, last_r), fus, ref)


def test_fused_multi_scan_op_registration():
    ext = fused.loader.load()
    x = _map_inputs(1, (3, 5), ext.lanes, 2)
    for name in ("u", "delta", "A", "Bm", "Cm", "bias", "h0"):
        x[name].requires_grad_()
    args = [x[name] for name in ("u", "delta", "A", "Bm", "Cm", "bias", "h0", "index")]
    for keep in (True, False):
        torch.library.opcheck(torch.ops.vmamba.multi_scan.default, args + [True, keep])


def test_fused_multi_scan_rejects_index_rows_that_are_not_permutations():
    """Every direction must visit every map row once (the kernel indexes with it and direction 0 writes the
    rows the others add to)."""
    index = scan_indices((3, 4), "cross2d")
    k, length = index.shape
    u, delta, A = torch.randn(1, length, 16), torch.randn(1, length, k, 16), -torch.rand(k, 1, 16)
    Bm = Cm = torch.randn(1, length, k, 1, 1)
    bad = index.clone()
    bad[1, 0] = bad[1, 1]  # a row visited twice, another never
    with pytest.raises(ValueError, match="permutation"):
        fused.fused_multi_scan(u, delta, A, Bm, Cm, bad)
    with pytest.raises(ValueError, match="index"):
        fused.fused_multi_scan(u, delta, A, Bm, Cm, index[:, :-1])
    E = torch.empty(0)
    with pytest.raises(RuntimeError, match="permutation"):
        fused.loader.load().forward(u.unsqueeze(2), delta, A, Bm, Cm, E, E, bad, True)
    out_of_range = index.clone()
    out_of_range[0, 0] = length
    with pytest.raises(RuntimeError, match="permutation"):
        fused.loader.load().forward(u.unsqueeze(2), delta, A, Bm, Cm, E, E, out_of_range, True)


def test_fused_multi_scan_checks_an_index_again_after_an_in_place_change():
    """A valid index is checked once (the result is kept while the tensor is unchanged): an in-place edit of
    the same tensor after a successful call is still caught."""
    index = scan_indices((3, 4), "cross2d").clone()
    k, length = index.shape
    u, delta, A = torch.randn(1, length, 16), torch.randn(1, length, k, 16), -torch.rand(k, 1, 16)
    Bm = Cm = torch.randn(1, length, k, 1, 1)
    first, _ = fused.fused_multi_scan(u, delta, A, Bm, Cm, index)
    again, _ = fused.fused_multi_scan(u, delta, A, Bm, Cm, index)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    index[1, 0] = index[1, 1]
    with pytest.raises(ValueError, match="permutation"):
        fused.fused_multi_scan(u, delta, A, Bm, Cm, index)


@pytest.mark.parametrize("d_state", [1, 16])
def test_fused_multi_scan_reads_strided_delta_in_place(d_state):
    """A delta in the dt projection's (K, B, L, D) memory order is read in place: same outputs and gradients
    as its contiguous copy, and d delta comes back in the same strides."""
    ext = fused.loader.load()
    x = _map_inputs(2, (9, 7), ext.lanes, d_state)
    strided = x["delta"].permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)  # (B, L, K, D) view
    assert not strided.is_contiguous() and torch.equal(strided, x["delta"])
    rest = [x[name] for name in ("A", "Bm", "Cm", "bias", "h0", "index")]
    y_c, last_c, marks = ext.forward(x["u"], x["delta"], *rest, True, True)
    y_s, last_s, _ = ext.forward(x["u"], strided, *rest, True, True)
    torch.testing.assert_close(y_s, y_c, rtol=0, atol=0)
    torch.testing.assert_close(last_s, last_c, rtol=0, atol=0)
    dy, dlast = torch.randn_like(y_c), torch.randn_like(last_c)
    grads_c = ext.backward(x["u"], x["delta"], *rest, True, dy, dlast, marks)
    grads_s = ext.backward(x["u"], strided, *rest, True, dy, dlast, marks)
    assert grads_s[1].stride() == strided.stride()
    for a, b in zip(grads_s, grads_c):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="unit channel stride"):
        ext.forward(x["u"], x["delta"].transpose(2, 3).contiguous().transpose(2, 3)[..., :1].expand_as(x["delta"]),
                    *rest, True)
    # Through the autograd op: the same gradients as a contiguous delta, and opcheck with the strided layout.
    leaves = [t.clone().requires_grad_() for t in (x["u"][:, :, 0], strided, x["A"], x["Bm"], x["Cm"], x["bias"])]
    y, _ = fused.fused_multi_scan(*leaves[:5], x["index"], delta_bias=leaves[5])
    g_strided = torch.autograd.grad((y * dy).sum(), leaves)
    leaves_c = [t.detach().contiguous().requires_grad_() for t in leaves]
    y, _ = fused.fused_multi_scan(*leaves_c[:5], x["index"], delta_bias=leaves_c[5])
    g_contig = torch.autograd.grad((y * dy).sum(), leaves_c)
    for a, b in zip(g_strided, g_contig):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    args = [x["u"], strided.clone().requires_grad_(), *rest[:4], rest[4], rest[5]]
    torch.library.opcheck(torch.ops.vmamba.multi_scan.default, args + [True, True])


@pytest.mark.parametrize("per_direction_u", [False, True])
@pytest.mark.parametrize("d_state, dim, length", [(1, 32, 37), (16, 20, 70), (4, 16, 1)])
def test_fused_d_skip_equals_adding_it_afterwards(per_direction_u, d_state, dim, length):
    """The optional per-direction D skip of the map layout: y gains sum_k D[k] u_k; gradients of u, D and the
    rest match the same sum computed outside the kernel."""
    g = torch.Generator().manual_seed(length + dim)
    batch, k = 2, 2
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u = r(batch, length, k, dim) if per_direction_u else r(batch, length, dim)
    inputs = dict(
        u=u, delta=r(batch, length, k, dim), A=-torch.rand(k, d_state, dim, generator=g) - 0.1,
        B=r(batch, length, k, 1, d_state), C=r(batch, length, k, 1, d_state), delta_bias=r(k, dim), D=r(k, dim),
    )
    index = torch.stack([torch.arange(length), torch.arange(length).flip(0)])
    fused_in = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    ref_in = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    y, last = fused.fused_multi_scan(**{n: t for n, t in fused_in.items()}, index=index)
    d = ref_in.pop("D")
    y_ref, last_ref = fused.fused_multi_scan(**ref_in, index=index)
    uu = ref_in["u"] if per_direction_u else ref_in["u"].unsqueeze(2)
    y_ref = y_ref + (uu * d).sum(2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, last_ref)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    ref_in["D"] = d
    for name in inputs:
        torch.testing.assert_close(fused_in[name].grad, ref_in[name].grad, rtol=1e-5, atol=1e-5, msg=name)
    with torch.no_grad():  # the inference call (no checkpoints) gives the same numbers
        y_nograd, _ = fused.fused_multi_scan(**inputs, index=index)
    torch.testing.assert_close(y_nograd, y.detach())


def _low_rank_case(batch, spatial, dim, rank, d_state, groups, per_direction_u, seed=0):
    """Leaves of a map-layout scan whose delta is low rank: ``x_dbl`` (B, L, K, R + 2 G N) holds the rows,
    B and C (as VMamba's x_proj output does, so the rows are a strided slice), ``dt_weight`` (K, D, R)."""
    g = torch.Generator().manual_seed(seed)
    index = scan_indices(spatial, "cross2d")
    k, length = index.shape
    u_shape = (batch, length, k, dim) if per_direction_u else (batch, length, dim)
    leaves = dict(
        u=torch.randn(*u_shape, generator=g), x_dbl=torch.randn(batch, length, k, rank + 2 * groups * d_state, generator=g),
        dt_weight=torch.randn(k, dim, rank, generator=g) / rank**0.5, A=-torch.rand(k, d_state, dim, generator=g) - 0.1,
        bias=torch.randn(k, dim, generator=g), D=torch.randn(k, dim, generator=g),
        h0=torch.randn(batch, k, d_state, dim, generator=g),
    )
    return index, {n: t.requires_grad_() for n, t in leaves.items()}


def _split_x_dbl(x_dbl, rank, d_state, groups):
    rows, Bm, Cm = torch.split(x_dbl, [rank, groups * d_state, groups * d_state], dim=-1)
    return rows, Bm.unflatten(-1, (groups, d_state)), Cm.unflatten(-1, (groups, d_state))


@pytest.mark.parametrize(
    "spatial, dim, rank, d_state, groups, per_direction_u",
    [((5, 7), 32, 3, 1, 1, False), ((1, 1), 16, 1, 1, 1, False), ((9, 4), 24, 5, 1, 1, False),
     ((3, 11), 40, 7, 16, 2, False), ((6, 6), 16, 24, 1, 1, True), ((2, 33), 48, 48, 2, 1, False)],
)
def test_fused_multi_scan_low_rank_delta_matches_the_loop_reference(spatial, dim, rank, d_state, groups,
                                                                    per_direction_u):
    """delta = dt_weight[k] @ rows computed inside the kernel (never materialised): outputs, last state and
    the gradients of every input (the rows through the x_proj output they are a slice of, and dt_weight
    included) match per-direction loop scans of the projected delta. Odd and single-step maps, non-square
    maps, channels that are not a multiple of the SIMD width (padded), ranks below and above one SIMD
    block, grouped B / C, one input per direction."""
    batch = 2
    index, leaves = _low_rank_case(batch, spatial, dim, rank, d_state, groups, per_direction_u)
    k, length = index.shape
    rows, Bm, Cm = _split_x_dbl(leaves["x_dbl"], rank, d_state, groups)
    y_f, last_f = fused.fused_multi_scan(
        leaves["u"], rows, leaves["A"], Bm, Cm, index, delta_bias=leaves["bias"], initial_state=leaves["h0"],
        D=leaves["D"], dt_weight=leaves["dt_weight"],
    )
    delta = torch.einsum("blkr,kcr->blkc", rows, leaves["dt_weight"])  # (B, L, K, D)
    y_r, last_r = _map_scan_reference(leaves["u"], delta, leaves["A"], Bm, Cm, index, leaves["bias"], leaves["h0"],
                                      leaves["D"])
    _assert_close_with_grads((y_f, last_f), (y_r, last_r), leaves, leaves)


def test_fused_multi_scan_low_rank_checkpoints_and_op_registration():
    """The low-rank backward gives the same gradients from the forward's checkpoints as from its own
    forward sweep, and the op passes torch.library.opcheck (fake shapes, autograd registration)."""
    ext = fused.loader.load()
    index, leaves = _low_rank_case(2, (7, 9), ext.lanes, 4, 1, 1, False, seed=1)
    x = {n: t.detach() for n, t in leaves.items()}
    rows, Bm, Cm = _split_x_dbl(x["x_dbl"], 4, 1, 1)
    weight = x["dt_weight"].transpose(1, 2).contiguous()  # the kernel's (K, R, D)
    E = torch.empty(0)
    args = [x["u"].unsqueeze(2), rows, x["A"], Bm.contiguous(), Cm.contiguous(), x["bias"], E, index]
    y, last, marks = ext.forward(*args, True, True, E, weight)
    dy, dlast = torch.randn_like(y), torch.randn_like(last)
    with_marks = ext.backward(*args, True, dy, dlast, marks, E, weight)
    without = ext.backward(*args, True, dy, dlast, E, E, weight)
    assert with_marks[1].shape == rows.shape and with_marks[8].shape == (2, *weight.shape)
    for a, b in zip(with_marks, without):
        if a is not None:  # dh0 is undefined without an initial state
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    op_args = [x["u"].unsqueeze(2), rows.clone().requires_grad_(), x["A"], Bm.contiguous(), Cm.contiguous(),
               x["bias"], None, index, True, True, None, weight.clone().requires_grad_()]
    torch.library.opcheck(torch.ops.vmamba.multi_scan.default, op_args)


def test_fused_multi_scan_low_rank_rejects_bad_weights_and_counts_the_projection():
    index, leaves = _low_rank_case(1, (3, 4), 16, 2, 3, 1, False)
    x = {n: t.detach() for n, t in leaves.items()}
    rows, Bm, Cm = _split_x_dbl(x["x_dbl"], 2, 3, 1)
    with pytest.raises(ValueError, match="dt_weight"):
        fused.fused_multi_scan(x["u"], rows, x["A"], Bm, Cm, index, dt_weight=x["dt_weight"][..., :1])
    from vmamba.ops.flops import count_flops

    k, length = index.shape
    flops = count_flops(lambda: fused.fused_multi_scan(x["u"], rows, x["A"], Bm, Cm, index, dt_weight=x["dt_weight"]))
    assert flops == 2 * (9 * length * k * 16 * 3 + length * k * 16 * 2)  # the scan + the dt projection's MACs


def test_fused_multi_scan_low_rank_beyond_the_kernels_rank_projects_in_python():
    """A dt rank above the kernel's limit (``max_rank``) is projected before the scan: same results."""
    ext = fused.loader.load()
    rank = ext.max_rank + 1
    index, leaves = _low_rank_case(1, (2, 3), 16, rank, 1, 1, False, seed=2)
    rows, Bm, Cm = _split_x_dbl(leaves["x_dbl"], rank, 1, 1)
    args = (leaves["u"], rows, leaves["A"], Bm, Cm, index)
    y, last = fused.fused_multi_scan(*args, delta_bias=leaves["bias"], dt_weight=leaves["dt_weight"])
    delta = torch.einsum("blkr,kcr->blkc", rows, leaves["dt_weight"])
    y_r, last_r = _map_scan_reference(leaves["u"], delta, leaves["A"], Bm, Cm, index, leaves["bias"],
                                      torch.zeros_like(leaves["h0"]))
    torch.testing.assert_close(y, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, last_r, rtol=1e-5, atol=1e-5)
