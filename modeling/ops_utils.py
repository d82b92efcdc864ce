"""Input validation and helpers shared by every FWP op backend.

The public ops (:func:`hf_fwp.ops.linear_attention`, :func:`hf_fwp.ops.delta_rule`) validate once and then
hand plain tensors to a backend; backends assume validated input. Layout everywhere: q, k ``[B, T, H, K]``,
v ``[B, T, H, V]``, beta and g ``[B, T, H]``, states ``[B, H, K, V]``.
"""

from __future__ import annotations

import numbers

import torch

BACKENDS = ("auto", "naive", "chunk", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def state_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype state math runs in: float64 when any input is float64 (for gradcheck), else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _shape(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    g: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    backend: str,
    op: str,
) -> None:
    """Raise ``ValueError`` naming the offending argument when the inputs break the op contract."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}.")
    named = {"q": q, "k": k, "v": v}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(
                f"{op}: `{name}` must have rank 4 with layout [B, T, H, D] (batch, time, heads, head dim); got {_shape(t)}."
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{op}: `{name}` must be a floating tensor (fp16, bf16, fp32 or fp64); got {_shape(t)}.")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(
            f"{op}: `k` must have the shape of `q` [B, T, H, K] = {tuple(q.shape)} (same batch, length, heads and "
            f"key dim); got {_shape(k)}."
        )
    if v.shape[:3] != (B, T, H):
        raise ValueError(
            f"{op}: `v` must be [B, T, H, V] with B, T, H = {B}, {T}, {H} taken from `q`; got {_shape(v)}. "
            "Repeat k/v heads yourself for grouped heads: no broadcasting is done."
        )
    if T == 0:
        raise ValueError(f"{op}: sequence length T must be at least 1; got q with {_shape(q)}.")
    if K == 0 or v.shape[-1] == 0 or H == 0 or B == 0:
        raise ValueError(f"{op}: batch, heads and head dims must be at least 1; got q {_shape(q)}, v {_shape(v)}.")
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        raise ValueError(f"{op}: q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}. Cast them "
                         "first (e.g. .to(q.dtype)).")
    if beta is not None:
        _check_gate(beta, "beta", (B, T, H), op)
    if g is not None:
        _check_gate(g, "g", (B, T, H), op)
    V = v.shape[-1]
    if initial_state is not None and not isinstance(initial_state, torch.Tensor):
        raise ValueError(f"{op}: `initial_state` must be a torch.Tensor or None; got {type(initial_state).__name__}.")
    if cu_seqlens is not None and not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"{op}: `cu_seqlens` must be a 1-D int32/int64 tensor of offsets [N + 1]; got a "
                         f"{type(cu_seqlens).__name__} (wrap it: torch.tensor(..., dtype=torch.int32)).")
    devices = {t.device for t in (q, k, v, beta, g, initial_state, cu_seqlens) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device; got {sorted(str(d) for d in devices)}.")
    N = B
    if cu_seqlens is not None:
        N = _check_cu_seqlens(cu_seqlens, B, T, op)
    if initial_state is not None:
        if initial_state.shape != (N, H, K, V):
            what = "number of sequences in cu_seqlens" if cu_seqlens is not None else "batch size"
            raise ValueError(
                f"{op}: `initial_state` must be [N, H, K, V] = {(N, H, K, V)} (N = {what}); got {_shape(initial_state)}."
            )
        if initial_state.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"{op}: `initial_state` must be float32 (states accumulate in fp32); got {_shape(initial_state)}. "
                "Call .float() on it."
            )
    if backend == "triton" and not q.is_cuda and not triton_interpreted():
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); got "
            f"tensors on {q.device}. Use backend='auto' or 'chunk' on CPU."
        )


def check_gate_values(beta: torch.Tensor | None, g: torch.Tensor | None, op: str) -> None:
    """Refuse ``g > 0`` (a growing state, not a decay) and ``beta`` outside [0, 2]. A host sync per given tensor,
    so the torch backends call it (they read every value anyway) and the Triton one does not; NaN passes (it
    propagates causally, as in the recurrence), and nothing is checked inside ``torch.compile``."""
    if torch.compiler.is_compiling():
        return
    bad_g = g is not None and bool((g > 0).any())
    bad_beta = beta is not None and bool(((beta < 0) | (beta > 2)).any())
    if bad_g:
        raise ValueError(f"{op}: `g` is a log-decay and must be <= 0 (exp(g) in [0, 1]); got a maximum of "
                         f"{g.max().item():.4g}. Pass a log-sigmoid or -softplus of your gate logits.")
    if bad_beta:
        raise ValueError(f"{op}: `beta` must lie in [0, 1] ([0, 2] with negative eigenvalues); got values from "
                         f"{beta.min().item():.4g} to {beta.max().item():.4g}. Pass sigmoid(logits) (or 2 * it).")


def check_flag(value, name: str, op: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{op}: `{name}` must be True or False; got {value!r}.")


def check_chunk_size(chunk_size, op: str) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{op}: `chunk_size` must be a positive int (e.g. 64); got {chunk_size!r}.")


def check_scale(scale, op: str) -> float | None:
    """``scale`` is None (the default ``K ** -0.5``) or a positive finite Python / NumPy number; returns it as a
    float (or None)."""
    ok = scale is None or (isinstance(scale, numbers.Real) and not isinstance(scale, bool)
                           and 0 < float(scale) < float("inf"))
    if not ok:
        hint = " (a tensor: pass scale.item())" if isinstance(scale, torch.Tensor) else ""
        raise ValueError(f"{op}: `scale` must be None (K ** -0.5) or a positive finite number{hint}; got {scale!r}.")
    return None if scale is None else float(scale)


def _check_gate(t: torch.Tensor, name: str, shape: tuple[int, int, int], op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: `{name}` must be a torch.Tensor of shape [B, T, H] = {shape}; got {type(t).__name__}.")
    if tuple(t.shape) != shape:
        raise ValueError(f"{op}: `{name}` must be [B, T, H] = {shape} (one value per token and head); got {_shape(t)}.")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{op}: `{name}` must be a floating tensor; got {_shape(t)}.")


def _check_cu_seqlens(cu: torch.Tensor, B: int, T: int, op: str) -> int:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: `cu_seqlens` must be a 1-D int32/int64 tensor of offsets [N + 1]; got {cu!r}.")
    if B != 1:
        raise ValueError(f"{op}: with `cu_seqlens` the sequences are packed along T, so B must be 1; got B = {B}.")
    if cu.numel() < 2:
        raise ValueError(f"{op}: `cu_seqlens` needs at least two offsets [0, ..., T]; got {cu.tolist()}.")
    offsets = cu.tolist()
    if offsets[0] != 0 or offsets[-1] != T:
        raise ValueError(f"{op}: `cu_seqlens` must start at 0 and end at T = {T}; got {offsets}.")
    if any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{op}: `cu_seqlens` must be strictly increasing (no empty sequences); got {offsets}.")
    return len(offsets) - 1


def triton_interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pack_varlen(x: torch.Tensor | None, cu_seqlens: torch.Tensor) -> torch.Tensor | None:
    """Scatter a packed ``[1, T, ...]`` tensor into a zero right-padded batch ``[N, T_max, ...]``.

    Zero padding after a sequence is exact for every FWP rule: a zero key writes nothing, a zero log-decay
    keeps the state, and a zero beta skips the delta update, so the final state of each row is its own.
    """
    if x is None:
        return None
    offsets = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    out = x.new_zeros((len(lengths), max(lengths)) + tuple(x.shape[2:]))
    for i, (start, n) in enumerate(zip(offsets, lengths)):
        out[i, :n] = x[0, start : start + n]
    return out


def unpack_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_varlen` for outputs: ``[N, T_max, ...]`` -> packed ``[1, T, ...]``."""
    offsets = cu_seqlens.tolist()
    parts = [x[i, : b - a] for i, (a, b) in enumerate(zip(offsets, offsets[1:]))]
    return torch.cat(parts, dim=0).unsqueeze(0)


def varlen_separately(fn, qkv, g, scale, initial_state, output_final_state, cu_seqlens, beta=None):
    """Run ``fn`` on each packed sequence separately and concatenate: the spec for ``cu_seqlens``."""
    offsets = cu_seqlens.tolist()
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(offsets, offsets[1:])):
        seg = [x[:, a:b] for x in qkv]
        kwargs = dict(g=None if g is None else g[:, a:b], scale=scale, output_final_state=True,
                      initial_state=None if initial_state is None else initial_state[i : i + 1])
        if beta is not None:
            seg.append(beta[:, a:b])
        o, S = fn(*seg, **kwargs)
        outs.append(o)
        finals.append(S)
    return torch.cat(outs, dim=1), (torch.cat(finals, dim=0) if output_final_state else None)


def varlen_padded(fn, qkv, g, scale, initial_state, output_final_state, cu_seqlens, beta=None, **kw):
    """Run ``fn`` once on the sequences of ``cu_seqlens`` scattered into a right-padded batch."""
    args = [pack_varlen(x, cu_seqlens) for x in qkv]
    if beta is not None:
        args.append(pack_varlen(beta, cu_seqlens))
    o, S = fn(*args, g=pack_varlen(g, cu_seqlens), scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, **kw)
    return unpack_varlen(o, cu_seqlens), S


def causal_nonfinite(run, q, k, v, beta, g, output_final_state: bool, cu_seqlens):
    """Run a chunked backend so that non-finite inputs stay causal, as in the token recurrence.

    Chunked products mix every token of a chunk (0 * NaN is NaN), so one NaN key would poison earlier outputs too.
    The recurrence is causal: a non-finite k, v, beta or g at token t makes the state, and every output from t on,
    non-finite; a non-finite q only its own output. Inputs without such values (checked once) run unchanged;
    otherwise ``run(q, k, v, beta, g)`` gets them zeroed and that pattern is restored as NaN (a -inf gate is not
    "non-finite" here: the public ops floor it first).
    """
    def bad(t, per_token: bool):
        if t is None:
            return None
        finite = torch.isfinite(t)
        return ~(finite.all(-1) if per_token else finite)

    # One sum per input (in float32, so fp16 sums do not overflow) is finite whenever every value is; only when it
    # is not (a non-finite value, or a sum past 3e38) do the exact per-token masks below run.
    total = sum(t.sum(dtype=torch.float32) for t in (q, k, v, beta, g) if t is not None)
    if bool(torch.isfinite(total)):
        return run(q, k, v, beta, g)
    bad_q, bad_state = bad(q, True), bad(k, True) | bad(v, True)
    for gate in (beta, g):
        if gate is not None:
            bad_state = bad_state | bad(gate, False)
    if not bool(bad_q.any() or bad_state.any()):
        return run(q, k, v, beta, g)
    clean = [None if t is None else t.nan_to_num(0.0, 0.0, 0.0) for t in (q, k, v, beta, g)]
    o, S = run(*clean)
    if cu_seqlens is None:
        after_bad = bad_state.long().cumsum(1) > 0  # [B, T, H]: at or after a poisoning token
        state_bad = bad_state.any(1)  # [B, H]
    else:  # per packed sequence
        spans = list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))
        after_bad = torch.cat([bad_state[:, a:b].long().cumsum(1) > 0 for a, b in spans], 1)
        state_bad = torch.stack([bad_state[0, a:b].any(0) for a, b in spans])
    o = o.masked_fill((after_bad | bad_q)[..., None], float("nan"))
    if output_final_state and S is not None:
        S = S.masked_fill(state_bad[..., None, None], float("nan"))
    return o, S
