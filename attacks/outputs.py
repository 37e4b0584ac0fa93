"""What a finished run stores for the attacks: the model's logits and softmax on
canaries, audit canaries, control images, and samples for label inference
(``outputs.pt``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from labeldp.augment import Normalize
from labeldp.train import predict_logits

from .canaries import Canaries

#: Training examples (non-canary) sampled for label inference.
LABEL_INFERENCE_SAMPLE = 10_000


def collect_outputs(
    model: nn.Module,
    train_images: torch.Tensor,
    true_train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    normalize: Normalize,
    canaries: Canaries | None,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Softmax outputs (float32, CPU) of ``model`` where the attacks need them.

    true_train_labels: the labels before canaries were planted (label inference compares
    with the real training labels of non-canary examples)."""

    classes: list[int] = []

    def softmax(images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[0] == 0 and classes:  # none of a kind: (0, K) tensors
            logits = torch.empty(0, classes[0])
        else:
            logits = predict_logits(model, images, normalize).cpu()
            classes[:] = [logits.shape[1]]
        return {"logits": logits, "softmax": torch.softmax(logits, dim=1)}

    n = train_images.shape[0]
    planted = torch.zeros(n, dtype=torch.bool)
    if canaries is not None:
        planted[canaries.indices] = True
        planted[canaries.audit_indices] = True
    candidates = torch.nonzero(~planted).flatten()
    sample = candidates[
        torch.randperm(len(candidates), generator=generator)[:LABEL_INFERENCE_SAMPLE]
    ]
    device = train_images.device
    heldout = {"labels": test_labels.cpu(), **softmax(test_images)}
    out: dict[str, Any] = {
        "train_sample": {
            "indices": sample,
            "labels": true_train_labels.cpu()[sample],
            **softmax(train_images[sample.to(device)]),
        },
        "heldout": heldout,
    }
    if canaries is not None:
        out["canary"] = softmax(train_images[canaries.indices.to(device)])
        out["audit"] = softmax(train_images[canaries.audit_indices.to(device)])
        out["control"] = softmax(test_images[canaries.control_indices.to(device)])
    return out
