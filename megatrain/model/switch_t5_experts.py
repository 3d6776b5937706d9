"""The expert loop model.family=switch_t5 trains with, in a module of its own: it subclasses transformers'
modeling code, which switch_t5.py imports only where a model is built (see megatrain/model/llama.py)."""

from __future__ import annotations

import torch
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersExperts


class EveryExpertRuns(SwitchTransformersExperts):
    """HF's expert loop, run over every expert, those no token chose included (on zero rows).

    HF runs only the experts some token chose, so ranks would differ in which parameters get a
    gradient and in what order; DeepSpeed's data-parallel gradient reduction (buckets filled as
    gradients arrive) then sends different sizes from different ranks and the collective fails
    ("Received data size doesn't match", seen on gloo). An expert on zero rows costs nothing and
    gives a zero gradient, in the same order on every rank.
    """

    def forward(self, hidden_states, selected_experts, routing_weights):
        final_hidden_states = torch.zeros_like(hidden_states)
        expert_mask = selected_experts.permute(2, 1, 0)  # (experts, top-k, tokens)
        for expert_idx in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            current = self[f"expert_{expert_idx}"](hidden_states[top_x]) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current.to(hidden_states.dtype))
        return final_hidden_states


def run_every_expert(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if type(module) is SwitchTransformersExperts:
            module.__class__ = EveryExpertRuns  # same parameters, the loop above
    return model
