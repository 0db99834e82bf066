"""A frozen-encoder linear probe: logistic regression on standardised features, the score
that compares pretrained encoders without fine-tuning them (bench/time_to_quality.py, bench/image_v1_vs_v2.py,
examples/text_controls.py)."""
from __future__ import annotations

import torch


def linear_probe(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor, l2: float = 1e-3) -> float:
    """xtr (N, D), ytr (N,) class ids; xte, yte the same for the scored split -> accuracy %.
    Full-batch L-BFGS in float64 on features standardised with the training split's statistics."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = ((xtr - mu) / sd).double(), ((xte - mu) / sd).double()
    C = int(ytr.max()) + 1
    W = torch.zeros(xtr.shape[1], C, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(C, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ W + b, ytr) + l2 * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * float(((xte @ W + b).argmax(1) == yte).double().mean())


def best_layer_probe(feats: dict, labels: dict, names=None) -> dict:
    """One linear probe per candidate layer, the layer chosen on validation.

    feats: {"train", "valid", "test"} -> (N, L, D) features of L candidate layers; labels: the
    same splits -> (N,) class ids; names: L labels of the candidates (default 1..L) ->
    {"layer": the chosen candidate, "valid": %, "test": %} (ties: the later layer)."""
    L = feats["train"].shape[1]
    names = list(names) if names is not None else list(range(1, L + 1))
    scores = []
    for i in range(L):
        fit = (feats["train"][:, i], labels["train"])
        scores.append((linear_probe(*fit, feats["valid"][:, i], labels["valid"]), i,
                       linear_probe(*fit, feats["test"][:, i], labels["test"])))
    valid, i, test = max(scores)  # by validation only
    return {"layer": names[i], "valid": round(valid, 2), "test": round(test, 2)}
