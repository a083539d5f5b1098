"""One small call of every CUDA op, forward and backward, for compute-sanitizer.

    compute-sanitizer --tool memcheck python bench/cuda_smoke.py
    compute-sanitizer --tool racecheck python bench/cuda_smoke.py

Shapes cover the awkward cases: Lq = Lk = 1, lengths that are not tile multiples, Lq < Lk
(bottom-right causal), GQA, transposed (B, L, H, D) inputs, -inf keys, a fully masked sample,
the split-K decode path (Lq = 1 against a long cache) and s_cross. Exits non-zero on any error.
"""
import torch

import atp_ops


def qkv(b, hq, hkv, lq, lk, d, dtype, transposed=False):
    def heads(h, n):
        if transposed:  # Hugging Face's layout: a (B, L, H, D) tensor viewed as (B, H, L, D)
            return torch.randn(b, n, h, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
        return torch.randn(b, h, n, d, device="cuda", dtype=dtype, requires_grad=True)

    return heads(hq, lq), heads(hkv, lk), heads(hkv, lk)


def key_bias(b, lk, dead_sample=False):
    kb = torch.randn(b, lk, device="cuda").clamp_max(0)
    kb[:, 1::3] = float("-inf")
    if dead_sample:
        kb[-1] = float("-inf")
    return kb.requires_grad_()


CASES = [
    # b, hq, hkv, lq, lk, d, dtype, causal, transposed, dead_sample
    (1, 1, 1, 1, 1, 64, torch.float16, True, False, False),
    (2, 4, 2, 17, 129, 64, torch.bfloat16, True, True, False),
    (2, 4, 4, 100, 40, 128, torch.float16, True, False, True),
    (1, 8, 2, 300, 300, 128, torch.bfloat16, False, False, False),
    (2, 8, 8, 1, 2880, 128, torch.bfloat16, True, False, False),  # split-K decode
    (2, 4, 1, 5, 700, 64, torch.float16, True, True, False),
]


def main():
    assert torch.cuda.is_available(), "needs a GPU"
    torch.manual_seed(0)
    for b, hq, hkv, lq, lk, d, dtype, causal, transposed, dead in CASES:
        q, k, v = qkv(b, hq, hkv, lq, lk, d, dtype, transposed)
        kb = key_bias(b, lk, dead)
        out, lse = atp_ops.atp_attention(q, k, v, kb, causal=causal, return_lse=True)
        (out.float().square().sum() + lse[torch.isfinite(lse)].sum()).backward()
        w_self = torch.rand(b, lq, device="cuda")
        w_cross = (torch.rand(b, lq, device="cuda") > 0.5).float()
        atp_ops.atp_scores(q, k, lse, kb, w_self, w_cross, causal=causal)
        n = 64
        s = torch.rand(b, n, device="cuda", requires_grad=True)
        th = torch.rand(b, device="cuda", requires_grad=True)
        m = atp_ops.atp_soft_mask(s, torch.rand(n, device="cuda"), th, th.detach() + 0.1, 10.0)
        m.sum().backward()
        atp_ops.atp_hard_mask(s.detach(), torch.rand(n, device="cuda"), th.detach(), th.detach())
        torch.cuda.synchronize()
        print(f"ok B{b} Hq{hq}/{hkv} Lq{lq} Lk{lk} D{d} {dtype} causal={causal} transposed={transposed}")
    print("cuda_smoke: all calls completed")


if __name__ == "__main__":
    main()
