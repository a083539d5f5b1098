"""Runs the host-emulated CUDA kernels (build.sh makes libemu.so) against atp_ops.reference,
with the host logic of csrc/cuda/ops_cuda.cpp (copies, split-K sizes, row lists) mirrored here.
``python check.py [quick|all|mutation]`` runs QUICK, ALL or MUTATION; tests/test_cuda_emulated.py runs ALL
under pytest (``python check.py serve``: one case per request, in a process the test restarts when
an EMU FAILURE aborts it), and mutations.py runs MUTATION on mutated kernels."""
import ctypes, os, sys
from functools import partial
import torch
from atp_ops import reference


class _Lib:
    """libemu.so: from load(directory), else from $OUT (default /tmp/atp_cuda_emu) on first use."""
    handle = None

    def __getattr__(self, name):
        if _Lib.handle is None:
            load(os.environ.get("OUT", "/tmp/atp_cuda_emu"))
        return getattr(_Lib.handle, name)


def load(directory):
    _Lib.handle = ctypes.CDLL(os.path.join(os.fspath(directory), "libemu.so"))


lib = _Lib()
P = ctypes.c_void_p
I = ctypes.c_int
L = ctypes.c_int64
F = ctypes.c_float


def ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def strides(t):
    return (ctypes.c_int64 * 3)(*t.stride()[:3])


def register(*tensors):
    """Tells the emulator which global memory the next launch may touch: the storages of `tensors`."""
    lib.emu_clear()
    for t in tensors:
        if t is not None:
            st = t.untyped_storage()
            lib.emu_register(ctypes.c_void_p(st.data_ptr()), L(st.nbytes()))


# cudaDevAttrMaxSharedMemoryPerMultiprocessor of the emulated device; it picks the forward's key
# tile at D = 128 (64 on sm_90, 32 on sm_80 / sm_86).
SMEM_PER_SM = {"sm_90": 228 * 1024, "sm_80": 164 * 1024, "sm_86": 100 * 1024}


def set_device(arch):
    """Emulates `arch`: its shared memory per SM (the host's tile choice) and its device-code
    paths (stmatrix on sm_90 only)."""
    lib.emu_set_smem_per_sm(I(SMEM_PER_SM[arch]))
    lib.emu_set_arch(I(int(arch[3:])))


def loadable(t):
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0
    for d in range(t.dim() - 1):
        ok = ok and (t.size(d) == 1 or t.stride(d) % 8 == 0)
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def fwd(q, k, v, bias, causal, scale, splits=1, arch="sm_90"):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    q, k, v = loadable(q), loadable(k), loadable(v)
    dt = 0 if q.dtype == torch.float16 else 1
    out = torch.empty(B, Hq, Lq, D, dtype=q.dtype)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32)
    kps = max(1, Lk)
    oacc = lacc = None
    if splits > 1:
        per = -(-Lk // splits)
        kps = -(-per // 64) * 64
        splits = -(-Lk // kps)
    if splits > 1:
        oacc = torch.empty(splits, B, Hq, Lq, D)
        lacc = torch.empty(splits, B, Hq, Lq)
    register(q, k, v, bias, out, lse, oacc, lacc)
    set_device(arch)
    lib.emu_fwd(I(dt), I(B), I(Hq), I(Hkv), I(Lq), I(Lk), I(D), ptr(q), strides(q), ptr(k), strides(k),
                ptr(v), strides(v), ptr(bias), L(bias.stride(0) if bias is not None else 0), F(scale),
                I(int(causal)), ptr(out), ptr(lse), I(splits), I(kps), ptr(oacc), ptr(lacc))
    return out, lse


def bwd(do, dlse, q, k, v, bias, out, lse, causal, scale, grad_bias=None, arch="sm_90", splits=None):
    """The backward; `splits` blocks per (batch, head) share its key blocks (None: as the host
    would choose on a 132-SM GPU)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    q, k, v, do, out = map(loadable, (q, k, v, do, out))
    dt = 0 if q.dtype == torch.float16 else 1
    if splits is None:
        block_n = lib.emu_bwd_block_n(I(D), I(SMEM_PER_SM[arch]))
        splits = lib.emu_bwd_num_splits(L(B * Hq), L(-(-Lk // block_n)), L(B * Hq * Lq * D * 4), L(132))
    dq_accum = torch.zeros(splits, B, Hq, Lq, D)
    delta = torch.empty(B, Hq, Lq)
    dq = torch.empty(B, Hq, Lq, D, dtype=q.dtype)
    dk = torch.full((B, Hq, Lk, D), float("nan"))
    dv = torch.full((B, Hq, Lk, D), float("nan"))
    db = torch.full((B, Hq, Lk), float("nan"))
    lse = lse.contiguous()
    dlse = dlse.contiguous() if dlse is not None else None
    register(q, k, v, bias, do, out, lse, dlse, delta, dq, dk, dv, db, grad_bias, dq_accum)
    set_device(arch)
    lib.emu_bwd(I(dt), I(B), I(Hq), I(Hkv), I(Lq), I(Lk), I(D), ptr(q), strides(q), ptr(k), strides(k),
                ptr(v), strides(v), ptr(bias), L(bias.stride(0) if bias is not None else 0), F(scale),
                I(int(causal)), ptr(do), strides(do), ptr(out), strides(out), ptr(lse), ptr(dlse),
                ptr(delta), ptr(dq), ptr(dk), ptr(dv), ptr(db), ptr(grad_bias),
                L(grad_bias.stride(0) if grad_bias is not None else 0), I(splits), ptr(dq_accum))
    g = Hq // Hkv
    dk = dk.view(B, Hkv, g, Lk, D).sum(2)
    dv = dv.view(B, Hkv, g, Lk, D).sum(2)
    return dq, dk.to(q.dtype), dv.to(q.dtype), db.sum(1)


def cross(q, k, lse, bias, w, causal, scale):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dt = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}[q.dtype]
    if dt != 2 and D in (64, 128):  # the tensor-core kernel loads 16-byte tiles, as ops_cuda.cpp arranges
        q, k = loadable(q), loadable(k)
    wc = w.float().contiguous()
    sel = (wc > 0).int()
    n_rows = sel.sum(1, dtype=torch.int32).contiguous()
    rows = torch.sort(sel, stable=True, dim=1, descending=True)[1].int().contiguous()
    w_sum = wc.sum(1).contiguous()
    s = torch.zeros(B, Lk)
    register(q, k, lse, bias, wc, rows, n_rows, w_sum, s)
    lib.emu_cross(I(dt), I(B), I(Hq), I(Hkv), I(Lq), I(Lk), I(D), ptr(q), strides(q), ptr(k), strides(k),
                  ptr(lse.contiguous()), ptr(bias), L(bias.stride(0) if bias is not None else 0), ptr(wc),
                  ptr(rows), ptr(n_rows), ptr(w_sum), F(scale), I(int(causal)), ptr(s))
    return s


def soft_mask_case(B, N, dtype, broadcast, seed=0):
    """The soft / hard mask kernels (forward and backward) against reference.soft_mask_ref /
    hard_mask_ref and autograd through the reference."""
    g = torch.Generator().manual_seed(seed)
    dt = 0 if dtype == torch.float32 else 1
    s_red = torch.rand(B, N, generator=g, dtype=dtype)
    s_sp = torch.rand(N if broadcast else (B, N), generator=g, dtype=dtype)
    if broadcast:
        s_sp = s_sp.reshape(N)
    th_r = torch.rand(B, generator=g, dtype=dtype)
    th_s = torch.rand(B, generator=g, dtype=dtype)
    prev = torch.randn(B, N, generator=g, dtype=dtype) * 0.1
    prev[torch.rand(B, N, generator=g) < 0.2] = float("-inf")
    temperature = 10.0
    sp_stride = 0 if broadcast else N
    print(f"--- soft_mask B{B} N{N} {dtype} s_spatial {'(N,)' if broadcast else '(B, N)'}")
    ok = True
    for hard in (False, True):
        out = torch.empty(B, N, dtype=dtype)
        lib.emu_soft_mask_fwd(I(dt), L(B), L(N), ptr(s_red), ptr(s_sp), L(sp_stride), ptr(th_r), ptr(th_s),
                              ptr(prev), ctypes.c_double(temperature), I(int(hard)), ptr(out))
        ref = (reference.hard_mask_ref(s_red, s_sp, th_r, th_s, prev) if hard
               else reference.soft_mask_ref(s_red, s_sp, th_r, th_s, temperature, prev))
        same = torch.equal(torch.isinf(out), torch.isinf(ref))
        fin = torch.isfinite(ref)
        e = (out[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0
        good = same and e <= (1e-5 if dtype == torch.float32 else 1e-12)
        print(f"{'OK   ' if good else 'FAIL '}{'hard' if hard else 'soft'}: err {e:.2e}, -inf pattern {'same' if same else 'DIFFERS'}")
        ok &= good
    grad = torch.randn(B, N, generator=g, dtype=dtype)
    d_red, d_sp = torch.empty(B, N, dtype=dtype), torch.empty(B, N, dtype=dtype)
    d_thr, d_ths = torch.empty(B, dtype=dtype), torch.empty(B, dtype=dtype)
    lib.emu_soft_mask_bwd(I(dt), L(B), L(N), ptr(grad), ptr(s_red), ptr(s_sp), L(sp_stride), ptr(th_r), ptr(th_s),
                          ctypes.c_double(temperature), ptr(d_red), ptr(d_sp), ptr(d_thr), ptr(d_ths))
    ins = [t.clone().requires_grad_(True) for t in (s_red, s_sp, th_r, th_s)]
    reference.soft_mask_ref(*ins[:2], *ins[2:], temperature).backward(grad)
    got = (d_red, d_sp.sum(0) if broadcast else d_sp, d_thr, d_ths)
    for name, a, r in zip(("d_s_red", "d_s_spatial", "d_theta_r", "d_theta_s"), got, ins):
        ok &= err(name, a, r.grad)
    return ok


def err(name, a, r, lp=None):
    a, r = a.double(), r.double()
    fa, fr = torch.isfinite(a), torch.isfinite(r)
    assert not torch.isnan(a).any(), f"{name}: NaN"
    assert torch.equal(fa, fr), f"{name}: finiteness differs"
    e = (a - r)[fa].abs().max().item() if fa.any() else 0.0
    msg = f"{name}: err {e:.2e}"
    if lp is not None:
        lp = lp.double()
        le = (lp - r)[fa & torch.isfinite(lp)].abs().max().item() if fa.any() else 0.0
        msg += f" lowp {le:.2e}"
        ok = e <= 2 * le + 1e-5 * max(1.0, r[fr].abs().max().item() if fr.any() else 1.0)
    else:
        ok = e <= 1e-4 * max(1.0, r[fr].abs().max().item() if fr.any() else 1.0)
    print(("OK   " if ok else "FAIL ") + msg)
    return ok


def case(B, Hq, Hkv, Lq, Lk, D, dtype, causal, bias_kind="neg_inf", splits=1, do_bwd=True, layout="contig", seed=0,
         arch="sm_90", bwd_splits=None):
    g = torch.Generator().manual_seed(seed)
    def mk(h, l):
        if layout == "blhd":
            return torch.randn(B, l, h, D, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(B, h, l, D, generator=g).to(dtype)
    q, k, v = mk(Hq, Lq), mk(Hkv, Lk), mk(Hkv, Lk)
    bias = None
    if bias_kind != "none":
        bias = torch.randn(B, Lk, generator=g)
        drop = torch.rand(B, Lk, generator=g) < 0.3
        drop[:, 0] = drop[:, -1] = False
        bias[drop] = float("-inf")
        if bias_kind == "dead":
            bias[-1] = float("-inf")
        if bias_kind == "pruned_range":  # a whole split's worth of removed keys
            bias[:, 1000:2000] = float("-inf")
    scale = D ** -0.5
    print(f"--- B{B} Hq{Hq} Hkv{Hkv} Lq{Lq} Lk{Lk} D{D} {dtype} causal={causal} bias={bias_kind} splits={splits} {layout} {arch}")
    out, lse = fwd(q, k, v, bias, causal, scale, splits, arch)
    f = lambda t: None if t is None else t.float()
    rq, rk, rv = (t.float().requires_grad_(True) for t in (q, k, v))
    rb = bias.clone().requires_grad_(True) if bias is not None else None
    ro, rl = reference.attention_ref(rq, rk, rv, rb, causal=causal, scale=scale, return_lse=True)
    lq_, lk_, lv_ = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    lb = bias.clone().requires_grad_(True) if bias is not None else None
    lo, ll = reference.attention_ref(lq_, lk_, lv_, lb, causal=causal, scale=scale, return_lse=True, upcast=False)
    ok = err("out", out, ro, lo) & err("lse", lse, rl)
    if not do_bwd:
        return ok
    do = torch.randn(out.shape, generator=g).to(dtype)
    dlse = torch.randn(lse.shape, generator=g)
    dq, dk, dv, db = bwd(do, dlse, q, k, v, bias, out, lse, causal, scale, arch=arch, splits=bwd_splits)
    def grads(o, l, ins):
        fl = torch.where(torch.isfinite(l), l, torch.zeros_like(l))
        loss = (o * do.to(o.dtype)).float().sum() + (fl.float() * dlse).sum()
        return torch.autograd.grad(loss, [t for t in ins if t is not None])
    rg = grads(ro, rl, (rq, rk, rv, rb))
    lg = grads(lo, ll, (lq_, lk_, lv_, lb))
    ok &= err("dq", dq, rg[0], lg[0]) & err("dk", dk, rg[1], lg[1]) & err("dv", dv, rg[2], lg[2])
    if bias is not None:
        ok &= err("dbias", db, rg[3], lg[3])
    return ok


def skip_case(B, Hq, Hkv, Lq, Lk, D, dtype, causal, splits, seed=0):
    """Packed decode skips the key tiles whose keys are all removed, without reading them: keys
    1024..1983 (whole tiles of 32 and 64) have key_bias -inf and NaN in K and V. Any read of them
    would make the output NaN; the reference sees zeros there."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, l, D, generator=g).to(dtype) for h, l in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    bias = torch.randn(B, Lk, generator=g)
    bias[:, 1024:1984] = float("-inf")
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, 1024:1984] = float("nan")
    v_nan[:, :, 1024:1984] = float("nan")
    scale = D ** -0.5
    print(f"--- skip B{B} Hq{Hq} Hkv{Hkv} Lq{Lq} Lk{Lk} D{D} {dtype} causal={causal} splits={splits}")
    out, lse = fwd(q, k_nan, v_nan, bias, causal, scale, splits)
    ro, rl = reference.attention_ref(q.float(), k.float(), v.float(), bias, causal=causal, scale=scale, return_lse=True)
    lo = reference.attention_ref(q, k, v, bias, causal=causal, scale=scale, upcast=False)
    return err("out", out, ro, lo) & err("lse", lse, rl)


def mask_case(B, Hq, Hkv, Lq, Lk, D, dtype, causal, with_bias=True, seed=0):
    """atp_attention with key_mask as ops.py runs it: the forward on key_bias + log M, the
    backward with grad_bias = key_bias (0 without one), whose d key_bias output is d key_mask.
    M holds exact zeros (sample 0: keys 64..191, two whole key tiles of the dK/dV kernel and
    more of the dQ kernel's); compared with autograd through the reference's product form,
    exact at M = 0. d key_bias = M * d key_mask."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, l, D, generator=g).to(dtype) for h, l in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    bias = None
    if with_bias:
        bias = torch.randn(B, Lk, generator=g)
        bias[torch.rand(B, Lk, generator=g) < 0.2] = float("-inf")
        bias[:, 0] = 0.0
    m = torch.rand(B, Lk, generator=g)
    m[torch.rand(B, Lk, generator=g) < 0.3] = 0.0
    m[0, 64:192] = 0.0
    m[:, 0] = 1.0
    comb = torch.log(m) if bias is None else bias + torch.log(m)
    grad_bias = bias if bias is not None else torch.zeros(B, Lk)
    scale = D ** -0.5
    print(f"--- key_mask B{B} Hq{Hq} Hkv{Hkv} Lq{Lq} Lk{Lk} D{D} {dtype} causal={causal} bias={with_bias}")
    out, lse = fwd(q, k, v, comb, causal, scale)
    do = torch.randn(out.shape, generator=g).to(dtype)
    dlse = torch.randn(lse.shape, generator=g)
    dq, dk, dv, dm = bwd(do, dlse, q, k, v, comb, out, lse, causal, scale, grad_bias)

    def grads(upcast):
        ins = [(t.float() if upcast else t).clone().requires_grad_(True) for t in (q, k, v)]
        rb = bias.clone().requires_grad_(True) if bias is not None else None
        rm = m.clone().requires_grad_(True)
        o, l = reference.attention_ref(*ins, rb, key_mask=rm, causal=causal, scale=scale, return_lse=True,
                                       upcast=upcast)
        fl = torch.where(torch.isfinite(l), l, torch.zeros_like(l))
        loss = (o * do.to(o.dtype)).float().sum() + (fl.float() * dlse).sum()
        return (o,) + torch.autograd.grad(loss, [t for t in (*ins, rb, rm) if t is not None])

    r, lp = grads(True), grads(False)
    ok = err("out", out, r[0], lp[0])
    ok &= err("dq", dq, r[1], lp[1]) & err("dk", dk, r[2], lp[2]) & err("dv", dv, r[3], lp[3])
    ok &= err("d_key_mask", dm, r[-1], lp[-1])
    if bias is not None:
        ok &= err("d_key_bias", m * dm, r[4], lp[4])
    zero = (m == 0) & (torch.isfinite(bias) if bias is not None else True)
    nonzero_at_zero = dm[zero].abs().sum().item() > 0
    print(("OK   " if nonzero_at_zero else "FAIL ") + "keys at M = 0 get a gradient")
    return ok & nonzero_at_zero


def cross_case(B, Hq, Hkv, Lq, Lk, D, dtype, causal, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    bias = torch.randn(B, Lk, generator=g)
    bias[torch.rand(B, Lk, generator=g) < 0.3] = float("-inf")
    bias[:, -1] = 0
    scale = D ** -0.5
    _, lse = reference.attention_ref(q.float(), k.float(), k.float(), bias, causal=causal, scale=scale, return_lse=True)
    w = torch.zeros(B, Lq)
    w[0, Lq // 2:] = 1.0
    if B > 1:
        w[1, 3:40] = torch.rand(37, generator=g)
    s = cross(q, k, lse, bias, w, causal, scale)
    _, r = reference.scores_ref(q, k, lse, bias, w, w, causal=causal, scale=scale)
    print(f"--- cross B{B} Hq{Hq} Hkv{Hkv} Lq{Lq} Lk{Lk} D{D} {dtype} causal={causal}")
    return err("s_cross", s, r)


QUICK = [partial(case, 1, 2, 1, 70, 100, 64, torch.float16, True)]
ALL = []
for _D in (64, 128):
    for _dtype in (torch.float16, torch.bfloat16):
        ALL.append(partial(case, 2, 2, 1, 70, 100, _D, _dtype, True, layout="blhd"))
        ALL.append(partial(case, 1, 2, 2, 33, 129, _D, _dtype, False, bias_kind="none"))
ALL += [
    partial(case, 1, 1, 1, 1, 1, 64, torch.float16, True),
    partial(case, 1, 1, 1, 1, 1, 128, torch.bfloat16, False),
    partial(case, 2, 2, 1, 100, 40, 64, torch.float16, True, bias_kind="dead"),
    partial(case, 2, 2, 2, 5, 700, 128, torch.bfloat16, True, splits=4, do_bwd=False),
    partial(case, 2, 2, 2, 1, 700, 64, torch.float16, False, bias_kind="dead", splits=3, do_bwd=False),
    partial(cross_case, 2, 4, 2, 60, 130, 64, torch.float16, True),
    partial(cross_case, 2, 4, 4, 60, 70, 128, torch.float32, False),
    partial(case, 1, 4, 2, 150, 300, 128, torch.bfloat16, True, layout="blhd", seed=1),
    partial(case, 1, 4, 2, 150, 300, 64, torch.float16, False, seed=2),
    partial(case, 2, 4, 1, 16, 2880, 128, torch.float16, True, splits=5, do_bwd=False, seed=3),
    partial(case, 1, 2, 2, 129, 129, 64, torch.bfloat16, True, bias_kind="none", seed=4),
    partial(cross_case, 1, 8, 2, 90, 700, 128, torch.bfloat16, True, seed=5),
    partial(cross_case, 3, 2, 1, 40, 90, 64, torch.float16, True, seed=6),  # sample 2: no rows
    partial(cross_case, 2, 4, 2, 60, 130, 96, torch.bfloat16, True, seed=7),  # D = 96 on tensor cores
    partial(cross_case, 2, 4, 2, 60, 130, 80, torch.float16, True, seed=7),  # D = 80: the scalar kernel
    partial(cross_case, 1, 6, 2, 300, 200, 128, torch.float16, False, seed=8),  # 150+ rows: many items
    partial(mask_case, 2, 4, 2, 70, 300, 64, torch.float16, True),
    partial(mask_case, 2, 2, 1, 100, 200, 128, torch.bfloat16, False, seed=1),
    partial(mask_case, 1, 2, 2, 33, 257, 64, torch.bfloat16, False, with_bias=False, seed=2),
    partial(mask_case, 2, 2, 2, 150, 90, 128, torch.float16, True, seed=3),  # Lq > Lk: rows that see nothing
    partial(soft_mask_case, 3, 576, torch.float32, False),
    partial(soft_mask_case, 2, 2500, torch.float64, True, seed=1),  # several forward blocks per row
    partial(soft_mask_case, 4, 100, torch.float32, True, seed=2),   # fewer tokens than threads
]


# The shapes of tests/test_cuda_attention.py (which needs a GPU), with fewer batches and heads
# where the GPU test is large: the FlashAttention error-rule grid, GQA without a bias, split-K
# decode against a pruned 2880-key cache, and both key tiles of D = 128 (sm_90 and sm_80).
GPU_SUITE = []
for _dtype in (torch.float16, torch.bfloat16):
    for _D in (64, 96, 128):
        for _causal in (False, True):
            for _i, (_lq, _lk) in enumerate([(1, 1), (17, 129), (64, 64), (129, 100), (200, 1000)]):
                GPU_SUITE.append(partial(case, 2, 4, 2, _lq, _lk, _D, _dtype, _causal, layout=("blhd", "contig")[_i % 2],
                                         seed=_lq * 1000 + _lk + _D))
    for _hq, _hkv in ((4, 4), (8, 2), (6, 1)):
        GPU_SUITE.append(partial(case, 1, _hq, _hkv, 77, 190, 64, _dtype, False, bias_kind="none", layout="blhd"))
    for _causal in (False, True):
        for _lq in (1, 4, 16):
            GPU_SUITE.append(partial(case, 2, 8, 2, _lq, 2880, 128, _dtype, _causal, bias_kind="pruned_range",
                                     splits=6, do_bwd=False, seed=_lq))
GPU_SUITE += [
    partial(case, 2, 8, 8, 1, 2880, 64, torch.bfloat16, False, bias_kind="dead", splits=4, do_bwd=False, seed=5),
    partial(case, 2, 4, 2, 70, 300, 64, torch.float16, False, bias_kind="dead", seed=3),
    partial(case, 2, 4, 2, 70, 300, 64, torch.float16, True, bias_kind="dead", seed=3),
    partial(case, 1, 2, 2, 150, 40, 64, torch.bfloat16, True, bias_kind="none", seed=4),
    partial(case, 2, 4, 2, 200, 1000, 128, torch.bfloat16, True, arch="sm_80", seed=9),
    partial(case, 1, 2, 1, 129, 300, 128, torch.float16, False, arch="sm_86", seed=10),
    partial(case, 2, 4, 1, 16, 2880, 128, torch.float16, True, splits=5, do_bwd=False, arch="sm_80", seed=11),
    # packed decode: 16 query heads x 12 queries of one KV head = 192 rows, two row blocks that
    # mix heads; and an unpacked decode (Hq = Hkv) beside it
    partial(case, 1, 32, 2, 12, 700, 64, torch.bfloat16, True, splits=3, do_bwd=False, seed=12),
    partial(case, 1, 32, 2, 12, 700, 128, torch.float16, False, do_bwd=False, seed=13),
    partial(case, 2, 4, 4, 3, 300, 128, torch.bfloat16, True, splits=2, do_bwd=False, seed=14),
    # the backward's key blocks dealt to several blocks per head (each with its own dQ slice)
    partial(case, 1, 2, 1, 150, 600, 128, torch.float16, True, bwd_splits=3, seed=20),
    partial(case, 2, 2, 2, 200, 300, 64, torch.bfloat16, False, bwd_splits=2, arch="sm_86", seed=21),
    # D = 96: decode (MHA, split-K, pruned cache), both key tiles and the sm_86 backward tiles
    partial(case, 2, 4, 4, 1, 2880, 96, torch.bfloat16, True, bias_kind="pruned_range", splits=4, do_bwd=False, seed=25),
    partial(case, 1, 4, 2, 150, 333, 96, torch.float16, True, arch="sm_80", seed=26),
    partial(case, 1, 2, 2, 130, 200, 96, torch.bfloat16, False, arch="sm_86", bwd_splits=2, seed=27),
    partial(skip_case, 2, 8, 2, 1, 2880, 128, torch.float16, False, splits=4, seed=15),
    partial(skip_case, 1, 16, 4, 4, 2100, 64, torch.bfloat16, True, splits=1, seed=16),
]
ALL += GPU_SUITE

# What mutations.py runs on each mutated kernel: the forward at both head dims, packed decode,
# causal with two query blocks and several key tiles, non-causal with Lq < Lk; s_cross; the
# backward with several splits per head, on sm_90 (P and dS by stmatrix) and sm_80 (st.shared).
MUTATION = [
    partial(case, 1, 8, 2, 3, 200, 64, torch.float16, True, splits=2, do_bwd=False),  # packed decode
    partial(case, 2, 8, 2, 1, 2880, 128, torch.bfloat16, False, bias_kind="pruned_range", splits=3,
            do_bwd=False),  # decode skipping removed tiles
    partial(case, 1, 2, 1, 150, 200, 64, torch.float16, True, do_bwd=False),
    partial(case, 1, 2, 1, 150, 200, 128, torch.bfloat16, True, do_bwd=False),
    partial(case, 1, 2, 1, 40, 300, 128, torch.float16, False, do_bwd=False),
    partial(cross_case, 1, 4, 2, 100, 130, 64, torch.float16, True),  # s_cross on tensor cores
    # the backward: causal with 3 key blocks dealt to 3 splits (a key block whose first row is
    # the last of a query block), and D = 64 over 2 splits
    partial(case, 1, 2, 1, 299, 300, 128, torch.float16, True, bwd_splits=3, seed=22),
    partial(case, 1, 2, 2, 200, 290, 64, torch.bfloat16, True, bwd_splits=2, seed=23),
    partial(case, 1, 2, 1, 130, 200, 64, torch.float16, False, arch="sm_80", seed=24),
]


def case_id(c):
    """A readable name of one entry of QUICK / ALL."""
    args = "-".join(str(a).replace("torch.", "") for a in c.args)
    kw = "-".join(f"{k}={v}" for k, v in c.keywords.items())
    return f"{c.func.__name__}-{args}" + (f"-{kw}" if kw else "")


def serve():
    """For each line of stdin, the index of an ALL case: runs it and answers ``RESULT <index> 1``
    (passed) or ``RESULT <index> 0`` on stdout, after the case's own output. A line ``abort``
    aborts the process, as an EMU FAILURE does (the callers' check that they survive one)."""
    for line in sys.stdin:
        if line.strip() == "abort":
            print("aborting on request", flush=True)
            os.abort()
        i = int(line)
        ok = ALL[i]()
        print(f"RESULT {i} {int(bool(ok))}", flush=True)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "quick"
    if which == "serve":
        serve()
        sys.exit(0)
    oks = [c() for c in {"quick": QUICK, "all": ALL, "mutation": MUTATION}[which]]
    print("ALL OK" if all(oks) else "SOME FAILED")
    sys.exit(0 if all(oks) else 1)
