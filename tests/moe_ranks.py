"""Train a few steps through megatrain's own setup and save what this rank holds, for tests/test_moe.py
and tests/test_dropless_moe.py.

Run as one process per rank (the RANK / WORLD_SIZE / MASTER_* environment set):
    python tests/moe_ranks.py OUT_DIR CONFIG [--section.key=value ...]
Writes OUT_DIR/rank<R>.pt: {"shared": {name: tensor}, "experts": {layer: {global id: (gate_up, down)}},
"logits": the model's logits (eval mode) on fixed token ids, the same on every rank}.
"""

import sys
from pathlib import Path

import torch

from megatrain import objective
from megatrain.config import load_config
from megatrain.model.moe import switch_layers
from megatrain.parallel.host import all_reduce_sum
from megatrain.parallel.zero import gathered_params
from megatrain.train import fetch, setup, train_step


def local_experts(model: torch.nn.Module) -> dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """This rank's experts per MoE layer, as HF rows: {layer: {global id: (gate_up_proj[e], down_proj[e])}}."""
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    found = {layer.layer_idx: layer.hf_experts() for layer in switch_layers(model)}
    for name, layer in model.named_modules():
        if isinstance(layer, AutoEPMoELayer):  # model.family=dropless_moe
            x, first = layer.experts, layer.ep_rank * layer.num_local_experts
            found[int(name.split(".")[2])] = {first + i: (torch.cat([x.w1[i], x.w3[i]]).clone(), x.w2[i].clone())
                                              for i in range(layer.num_local_experts)}
    return found


out, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
s = setup(load_config(config, overrides), resume=False)
for _ in range(s.cfg.train.steps):
    batches, _ = fetch(s.loader, s.plan.accumulation)
    # As train()'s loop: the loss is the mean over every rank's label tokens (objective.py).
    all_labels = all_reduce_sum([objective.label_tokens(batches, s.family.task)])[0] / s.world.tp
    train_step(s.engine, batches, len(s.loader.source_names), s.family,
               objective.step_scale(all_labels, s.plan.accumulation, s.plan.dp))
model = s.engine.module.eval()
with torch.no_grad():
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits
with gathered_params(model):  # ZeRO-3 holds a slice of each parameter
    shared = {k: v.detach().clone() for k, v in model.state_dict().items() if ".experts." not in k}
    experts = local_experts(model)
torch.save({"shared": shared, "experts": experts, "logits": logits}, out / f"rank{s.world.rank}.pt")
s.loader.close()
torch.distributed.barrier()
