"""LM head + cross-entropy in row chunks, so the logits of all positions are never alive at once.

The plain path keeps N x vocab logits in the compute dtype, their fp32 copy, the log-softmax saved for
backward and its gradient: for 2,048 supervised positions and a 128k vocabulary that is about 3 GB, often
the largest single item in a LoRA step. Here each chunk of rows computes its logits and losses and,
when a gradient will be needed, the gradient with respect to its hidden states right away; then the
chunk's logits are freed. Backward only scales those stored hidden-state gradients by the incoming
per-position gradients. The matmuls are the same two as in the plain path (logits, and the gradient
through the head), both now run in forward, so it costs no extra compute.

The head weight gets no gradient here: it is frozen in LoRA training. Callers fall back to the plain
path when it is trained (for example a head listed in `modules_to_save`).

Token accuracy (is the arg-max prediction the label?) comes out of the same pass: an arg-max over each
chunk's logits before they are freed, so it costs no extra memory.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MiB in fp32, plus a transient 16-bit copy under autocast


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary of `vocab` tokens."""
    return max(1, CHUNK_ELEMENTS // vocab)


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul would run in here: autocast's when it is on, else the promoted one."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk(hidden, w, target, dtype, want_grad: bool):
    """Losses, arg-max hits and (if wanted) the gradient with respect to `hidden` of one chunk of rows.

    A function of its own so the chunk's logits are freed on return, before the next chunk allocates.
    """
    logits = (hidden.to(dtype) @ w.T).float()
    correct = logits.argmax(dim=-1) == target
    picked = logits.gather(1, target[:, None]).squeeze(1)
    # log-sum-exp in place (torch.logsumexp would allocate another rows x vocab fp32 tensor)
    top = logits.amax(dim=-1, keepdim=True)
    exp = logits.sub_(top).exp_()
    total = exp.sum(dim=-1, keepdim=True)
    losses = (top + total.log()).squeeze(1) - picked
    if not want_grad:
        return losses, correct, None
    probs = exp.div_(total)  # d loss_i / d logits_i = softmax_i - onehot(t_i), formed in place
    probs[torch.arange(len(target), device=target.device), target] -= 1.0
    return losses, correct, probs.to(dtype) @ w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, dtype, rows, grad_enabled):  # noqa: D102 - see module docstring
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        correct = torch.empty(n, dtype=torch.bool, device=hidden.device)
        # needs_input_grad says only that `hidden` requires a gradient, even under torch.no_grad();
        # the caller's grad mode (forward itself always runs without it) decides whether one is wanted
        want_grad = grad_enabled and ctx.needs_input_grad[0]
        grad = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if want_grad else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for lo in range(0, n, rows):
                part, hits, part_grad = _chunk(hidden[lo : lo + rows], w, target[lo : lo + rows], dtype, want_grad)
                losses[lo : lo + rows] = part
                correct[lo : lo + rows] = hits
                if want_grad:
                    grad[lo : lo + rows] = part_grad
        ctx.hidden_dtype = hidden.dtype
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return losses, correct

    @staticmethod
    def backward(ctx, grad_losses, _grad_correct):  # noqa: D102
        (grad,) = ctx.saved_tensors
        grad_hidden = (grad.float() * grad_losses[:, None].float()).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, rows: int | None = None
) -> torch.Tensor:
    """Per-position cross-entropy of `hidden @ weight.T` (fp32 losses, shape `[N]`) for `hidden` `[N, H]`.

    Equals `F.cross_entropy(F.linear(hidden, weight).float(), target, reduction="none")` (under the same
    autocast), with peak memory of one chunk of `rows` logits instead of all N. `target` holds no
    ignore index: pass only the supervised positions. `weight` must not require a gradient.
    """
    return linear_cross_entropy_with_accuracy(hidden, weight, target, rows)[0]


def linear_cross_entropy_with_accuracy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`linear_cross_entropy`, plus a boolean `[N]` map of positions whose arg-max logit is the target."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy gives no gradient to the head weight; use the plain loss")
    rows = rows or chunk_rows(weight.shape[0])
    dtype = compute_dtype(hidden, weight)
    return _LinearCrossEntropy.apply(hidden, weight, target, dtype, rows, torch.is_grad_enabled())
