"""DeepSpeed's top-k gate with its token mask honoured under top-2 as well as top-1.

DeepSpeed 0.19.8's TopKGate hands `used_token` (which tokens are real) to top1gating only; top2gating
takes no mask (moe/sharded_moe.py 559-582), so under top-2 the pads and zero fillers of a training
micro-batch take expert slots. Capacity is filled by position, second choices after every first
choice (sharded_moe.py 349-352), so a pad's first choice can push a real token's second choice over
capacity: the loss then depends on how much padding the batch has. `masked_top2_routes` is
DeepSpeed's top2gating for the one case the MoE layer runs it in (sparse routes, drop_tokens=true,
the second expert the second-best, not sampled: model/moe.py builds it so), with the mask applied to
both choices before their slots are counted, as top1gating applies it (sharded_moe.py 241-247).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate, _capacity, multiplicative_jitter


def masked_top2_routes(logits: torch.Tensor, used_token: torch.Tensor, capacity_factor: float, min_capacity: int):
    """DeepSpeed's top2gating(sparse_routes=True, drop_tokens=True, top2_2nd_expert_sampling=False)
    (sharded_moe.py 322-400) where tokens with used_token 0 take no route and no slot.

    Returns what the MOELayer reads: (l_aux, capacity, num_experts, expert index per route (2, tokens)
    with -1 where the route was dropped or masked, slot per route, gate weight per route, tokens per
    expert before capacity).
    """
    gates = F.softmax(logits, dim=1)
    num_experts = gates.shape[1]
    used = used_token.reshape(-1, 1).to(torch.int64)
    indices1 = gates.argmax(dim=1)
    first = F.one_hot(indices1, num_experts)
    indices2 = logits.masked_fill(first.bool(), float("-inf")).argmax(dim=1)
    mask1, mask2 = first * used, F.one_hot(indices2, num_experts) * used
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(dim=0, keepdim=True)
    l_aux = torch.mean(gates.mean(dim=0) * mask1.float().mean(dim=0)) * num_experts * num_experts
    exp_counts = (mask1 + mask2).sum(dim=0).detach()
    # Counted on every token handed in (the micro-batch's token budget), masked or not, as DeepSpeed does:
    # the same on every rank, which the expert-parallel all-to-all needs.
    capacity = _capacity(gates, torch.tensor(capacity_factor * 2), torch.tensor(min_capacity))
    mask1 = mask1 * torch.lt(locations1, capacity)
    mask2 = mask2 * torch.lt(locations2, capacity)
    locations1_s, locations2_s = (locations1 * mask1).sum(dim=1), (locations2 * mask2).sum(dim=1)
    gates1_s, gates2_s = (gates * mask1).sum(dim=1), (gates * mask2).sum(dim=1)
    denom = torch.clamp(gates1_s + gates2_s, min=torch.finfo(gates.dtype).eps)
    dropped = torch.full_like(indices1, -1)
    indices = torch.stack([torch.where(mask1.any(dim=1), indices1, dropped),
                           torch.where(mask2.any(dim=1), indices2, dropped)])
    return (l_aux, capacity, num_experts, indices.to(torch.int32),
            torch.stack([locations1_s, locations2_s]).to(torch.int32), torch.stack([gates1_s, gates2_s]) / denom,
            exp_counts)


class MaskedTopKGate(TopKGate):
    """TopKGate whose top-2 honours `used_token` (its top-1 already does); everything else is DeepSpeed's."""

    def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None, sparse_routes: bool = False,
                use_tutel: bool = False):
        if self.k != 2 or used_token is None:
            return super().forward(input, used_token, sparse_routes, use_tutel)
        if not (sparse_routes and self.drop_tokens and not self.top2_2nd_expert_sampling):
            raise NotImplementedError("a token mask under top-2 needs sparse routes, drop_tokens and the "
                                      "second-best expert (model/moe.py builds the gate so)")
        input_fp32 = input.float()
        if self.noisy_gate_policy == "Jitter" and self.training:  # as TopKGate.forward (sharded_moe.py 568-572)
            input_fp32 = multiplicative_jitter(input_fp32, device=input.device)
        logits = F.linear(input_fp32, weight=self.wg.weight.float(), bias=None)
        return masked_top2_routes(logits, used_token, self.capacity_factor if self.training
                                  else self.eval_capacity_factor, self.min_capacity)
