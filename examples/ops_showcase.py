"""A tour of the FWP ops (`make ops-demo`).

1. The four rules through every backend available here: agreement with the token-by-token spec and timings.
2. Streaming: a long sequence processed in one call equals the same sequence fed in pieces (passing the state),
   and equals token-by-token decoding: the state is all a model needs to keep, whatever the context length.
3. Why the delta rule: store key -> value pairs in fast weights, overwrite some, read them back.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from hf_fwp.ops import delta_rule, linear_attention

torch.manual_seed(0)


def rule_call(rule, q, k, v, beta, g, **kw):
    if rule in ("linear", "gated_linear"):
        return linear_attention(q, k, v, g=g if rule == "gated_linear" else None, **kw)
    return delta_rule(q, k, v, beta, g=g if rule == "gated_delta" else None, **kw)


def part1(device):
    B, T, H, D = 1, 1024, 4, 64
    q, v = torch.randn(B, T, H, D, device=device), torch.randn(B, T, H, D, device=device)
    k = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1)
    beta, g = torch.rand(B, T, H, device=device), F.logsigmoid(torch.randn(B, T, H, device=device))
    backends = ["naive", "chunk"] + (["triton"] if device == "cuda" else [])
    print(f"1) every rule, every backend (B={B}, T={T}, H={H}, K=V={D}, device={device})")
    print(f"   {'rule':<13}" + "".join(f"{b + ' ms':>12}" for b in backends) + f"{'max |o - o_naive|':>22}")
    for rule in ("linear", "gated_linear", "delta", "gated_delta"):
        outs, times = {}, []
        for backend in backends:
            t0 = time.perf_counter()
            outs[backend] = rule_call(rule, q, k, v, beta, g, backend=backend)[0]
            times.append((time.perf_counter() - t0) * 1e3)
        err = max((outs[b] - outs["naive"]).abs().max().item() for b in backends)
        print(f"   {rule:<13}" + "".join(f"{t:12.1f}" for t in times) + f"{err:22.2e}")


def part2(device):
    B, T, H, D = 1, 4000, 2, 32
    q, v = torch.randn(B, T, H, D, device=device), torch.randn(B, T, H, D, device=device)
    k = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1)
    beta, g = torch.rand(B, T, H, device=device), F.logsigmoid(torch.randn(B, T, H, device=device) + 3)
    o_full, S_full = delta_rule(q, k, v, beta, g=g, output_final_state=True)
    pieces, S = [], None
    cuts = [0, 1000, 1001, 2500, 3990]
    for a, b in zip(cuts, cuts[1:]):
        o, S = delta_rule(q[:, a:b], k[:, a:b], v[:, a:b], beta[:, a:b], g=g[:, a:b], initial_state=S,
                          output_final_state=True)
        pieces.append(o)
    for t in range(cuts[-1], T):  # the decoding path: one token at a time
        o, S = delta_rule(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], beta[:, t:t + 1], g=g[:, t:t + 1],
                          initial_state=S, output_final_state=True)
        pieces.append(o)
    o_pieces = torch.cat(pieces, dim=1)
    print(f"\n2) streaming a {T}-token gated-delta sequence in pieces {cuts[1:]} then 10 single tokens")
    print(f"   max |o_pieces - o_full| = {(o_pieces - o_full).abs().max().item():.2e}, "
          f"max |S_pieces - S_full| = {(S - S_full).abs().max().item():.2e}")
    print(f"   state carried between pieces: {S.numel() * S.element_size()} bytes, the same at any length "
          f"(a softmax KV cache for these {T} tokens would be {2 * T * H * D * 4} bytes)")


def part3(device):
    D, n, n_over = 64, 48, 16
    keys = torch.linalg.qr(torch.randn(D, D, device=device))[0][:n]  # orthonormal: within the K-slot capacity
    values, new_values = torch.randn(n, D, device=device), torch.randn(n_over, D, device=device)
    # A stream of n writes, then n_over rewrites of the first keys with new values, then n reads.
    k = torch.cat([keys, keys[:n_over]])[None, :, None]
    v = torch.cat([values, new_values])[None, :, None]
    want = torch.cat([new_values, values[n_over:]])
    print(f"\n3) fast-weight memory: write {n} orthonormal key->value pairs (K={D}), rewrite {n_over}, read all back")
    for rule in ("linear", "delta"):
        beta = torch.ones(1, k.shape[1], 1, device=device)
        _, S = rule_call(rule, k, k, v, beta, None, scale=1.0, output_final_state=True)
        read = keys @ S[0, 0]  # o = S^T k for every stored key
        err = (read - want).norm(dim=-1) / want.norm(dim=-1)
        print(f"   {rule:<6} rule: mean relative read-out error {err.mean().item():.3f} "
              f"(rewritten pairs {err[:n_over].mean().item():.3f}, untouched {err[n_over:].mean().item():.3f})")
    print("   the delta rule replaces what a key stored; plain linear attention only adds to it")


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    part1(dev)
    part2(dev)
    part3(dev)
