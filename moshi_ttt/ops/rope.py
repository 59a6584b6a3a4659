"""Rotary position embedding at absolute positions (Moshi's interleaved-pair layout), and YaRN.

YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models"):
"NTK-by-parts" frequencies (§3.2) plus an attention temperature (§3.4). Pair d has frequency
θ_d = b^(-2d/|D|) (b = ``max_period``, |D| = ``head_dim``), wavelength λ_d = 2π/θ_d and ratio
r(d) = L/λ_d (L = ``original_context``: how many turns pair d makes over the trained context).
With the ramp γ(r) = 0 for r < α, 1 for r > β, (r - α)/(β - α) between (α = ``beta_slow``,
β = ``beta_fast``), the new frequency is

    h(θ_d) = (1 - γ(r(d))) θ_d / s + γ(r(d)) θ_d

so pairs that turn more than β times over L keep θ_d, pairs that turn less than α times are
interpolated by s, and the band between is blended. The attention logits get a temperature t:

    softmax(q_mᵀ k_n / (t √|D|)),   √(1/t) = 0.1 ln(s) + 1.

``yarn_attention_scale`` returns √(1/t): multiply q and k each by it, or the logits by its square
(``StreamingAttention`` multiplies the logits).

The ramp here is the paper's, continuous in r. The authors' code (jquesnelle/yarn) blends over
pair indices between floor(d(β)) and ceil(d(α)), where d(r) is the (fractional) pair whose ratio
is r; it agrees with this one outside the ramp band and differs slightly inside it.
"""

from __future__ import annotations

import math

import torch


def rope_frequencies(head_dim: int, max_period: float, device=None) -> torch.Tensor:
    """Angular frequency of each pair: ``max_period ** (-2 d / head_dim)``. [head_dim // 2] fp32."""
    d = torch.arange(head_dim // 2, device=device, dtype=torch.float32)
    return torch.exp(d * (-math.log(max_period) * 2.0 / head_dim))


def yarn_ramp(r: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """γ(r): 0 below α (interpolate), 1 above β (keep), linear between."""
    return ((r - alpha) / (beta - alpha)).clamp(0.0, 1.0)


def yarn_frequencies(
    head_dim: int,
    max_period: float,
    scale: float,
    original_context: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    device=None,
) -> torch.Tensor:
    """YaRN's NTK-by-parts frequencies h(θ_d) for a context extended ``scale`` times beyond
    ``original_context`` steps. [head_dim // 2] fp32; ``scale <= 1``: ``rope_frequencies``
    exactly."""
    theta = rope_frequencies(head_dim, max_period, device)  # [D/2]
    if scale <= 1:
        return theta
    if original_context < 1 or not beta_fast > beta_slow:
        raise ValueError(
            f"YaRN needs original_context >= 1 and beta_fast > beta_slow, got "
            f"{original_context}, {beta_fast}, {beta_slow}"
        )
    theta64 = theta.double()
    r = original_context * theta64 / (2 * math.pi)  # L / λ_d: turns over the trained context
    gamma = yarn_ramp(r, beta_slow, beta_fast)
    return ((1 - gamma) * theta64 / scale + gamma * theta64).float()


def yarn_frequencies_naive(
    head_dim: int,
    max_period: float,
    scale: float,
    original_context: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> torch.Tensor:
    """Reference: one pair at a time, in Python floats, straight from the equations above."""
    out = []
    for d in range(head_dim // 2):
        theta = max_period ** (-2 * d / head_dim)
        if scale <= 1:
            out.append(theta)
            continue
        wavelength = 2 * math.pi / theta
        r = original_context / wavelength
        if r < beta_slow:
            gamma = 0.0
        elif r > beta_fast:
            gamma = 1.0
        else:
            gamma = (r - beta_slow) / (beta_fast - beta_slow)
        out.append((1 - gamma) * theta / scale + gamma * theta)
    return torch.tensor(out, dtype=torch.float32)


def yarn_attention_scale(scale: float) -> float:
    """√(1/t) = 0.1 ln(s) + 1 (§3.4); 1.0 for ``scale <= 1``. Multiplies q and k each, so the
    logits are multiplied by its square (1/t)."""
    return 0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0


def rope_angles(pos: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of the angles pos · freqs: pos [B, T] absolute positions (any integers), freqs
    [D/2] -> [B, 1, T, D/2] each, fp32."""
    p = pos[:, None, :, None]  # [B, 1, T, 1]; with fp32 freqs, cast to fp32 inside the product
    angle = (p if freqs.dtype == torch.float32 else p.to(torch.float32)) * freqs  # [B, 1, T, D/2]
    return torch.cos(angle), torch.sin(angle)


def apply_rope(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[2d], x[2d+1])`` of ``x`` [B, H, T, D] by ``pos * freqs[d]``.

    ``pos`` [B, T] holds absolute positions (any integers); computed in fp32, returned in x's dtype.
    """
    return rotate(x, *rope_angles(pos, freqs))


def apply_rope_qk(
    q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rope`` of q and k [B, H, T, D] at the same positions, the angles formed once."""
    c2, s2 = interleaved(*rope_angles(pos, freqs))
    return rotate_interleaved(q, c2, s2), rotate_interleaved(k, c2, s2)


def interleaved(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [..., D/2] -> c2 = (c, c), s2 = (-s, s) pair by pair, [..., D] each."""
    return torch.stack((cos, cos), -1).flatten(-2), torch.stack((-sin, sin), -1).flatten(-2)


def _swap(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] with the two entries of every pair exchanged."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


class _Rotation(torch.autograd.Function):
    """y = x c2 + swap(x) s2 and its gradient x̄ = ȳ c2 + swap(ȳ s2) formed as one tensor, so
    autograd sums the same terms in the same order as for ``rotate_reference``."""

    @staticmethod
    def forward(ctx, x, c2, s2):
        ctx.save_for_backward(x, c2, s2)
        return x * c2 + _swap(x) * s2

    @staticmethod
    def backward(ctx, g):
        x, c2, s2 = ctx.saved_tensors
        need_x, need_c, need_s = ctx.needs_input_grad
        gx = g * c2 + _swap(g * s2) if need_x else None
        gc = (g * x).sum_to_size(c2.shape) if need_c else None
        gs = (g * _swap(x)).sum_to_size(s2.shape) if need_s else None
        return gx, gc, gs


def rotate_interleaved(x: torch.Tensor, c2: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """The rotation of ``rotate`` from ``interleaved`` (c2, s2): x c2 + swap(x) s2, swap
    exchanging the two entries of every pair, so pair (a, b) goes to (a c - b s, b c + a s): the
    products and sums of ``rotate_reference`` exactly (negation is exact, the sum commutes), bit
    for bit, in 4 kernels instead of 7 (a 16-bit x is promoted to fp32 inside the products); and
    so is its gradient, (ā c + b̄ s, b̄ c - ā s) for the pair (ā, b̄) of the output's
    (``_Rotation``)."""
    xf = x if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else x.float()
    return _Rotation.apply(xf, c2, s2).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation of ``apply_rope`` by given cos, sin (broadcast to [..., D/2]): x [..., D] -> x's
    dtype. ``rotate_interleaved``; ``rotate_reference`` computes the same pair by pair."""
    return rotate_interleaved(x, *interleaved(cos, sin))


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``rotate`` pair by pair: (a, b) -> (a c - b s, a s + b c) in fp32, then x's dtype."""
    xp = x.float().unflatten(-1, (-1, 2))
    xr, xi = xp[..., 0], xp[..., 1]  # [..., D/2] each
    return torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1).flatten(-2).to(x.dtype)
