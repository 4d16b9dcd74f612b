"""SparseGPT (Frantar & Alistarh, 2023): prune column blocks by OBS saliency w²/[H⁻¹]²_jj and update the
remaining weights to compensate, using the inverse Hessian H = 2XᵀX of the layer inputs (dampened)."""

from __future__ import annotations

import torch


class HessianStats:
    """Running average of 2·XᵀX over calibration tokens (float64 accumulation)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        n = x.shape[0]
        self.H *= self.tokens / (self.tokens + n)
        self.tokens += n
        x = x * (2.0 / self.tokens) ** 0.5
        self.H += x.T @ x


@torch.no_grad()
def prune_sparsegpt(weight: torch.Tensor, stats: HessianStats, sparsity: float, nm: tuple[int, int] | None = None,
                    blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """Prune `weight` [out, in] in place with error compensation; returns the pruned mask."""
    W = weight.detach().double().clone()
    rows, cols = W.shape
    H = stats.H.clone().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if nm is None:
            if sparsity > 0:
                score = W1 ** 2 / d.unsqueeze(0) ** 2
                k = int(score.numel() * sparsity)
                mask1 = torch.zeros(score.numel(), dtype=torch.bool, device=W.device)
                mask1[torch.argsort(score.flatten())[:k]] = True
                mask1 = mask1.reshape(score.shape)
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = W1[:, i:i + m] ** 2 / d[i:i + m].unsqueeze(0) ** 2
                drop = torch.topk(score, m - n, dim=1, largest=False).indices
                mask1.scatter_(1, i + drop, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W[pruned] = 0  # exact zeros where pruned (float error cannot leave tiny values)
    weight.copy_(W.to(weight.dtype))
    return pruned
