"""The recurrent language model of the TinyStories study's comparison, as a transformers model: token
embedding, stacked LSTM, output layer tied to the embedding.

It is a `PreTrainedModel` so that it goes through the same paths as the transformer families:
`save_pretrained` folders (the run's `hf/` export), `from_pretrained`, and `generate` (greedy or
sampled). Generation carries the LSTM state from step to step (as transformers' RWKV carries its
own), so each new token costs one step of the recurrence, not a pass over the whole text.

Padding: training rows are padded on the right, where pads come after every real token and change
none of their outputs. Generation pads prompts on the left; there the real tokens of each row are
moved to the front and run as a packed sequence, so a row's state is that of its own tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


class LSTMConfig(PretrainedConfig):
    model_type = "megatrain_lstm"

    def __init__(self, vocab_size: int = 512, hidden_size: int = 256, num_hidden_layers: int = 2,
                 initializer_range: float = 0.02, tie_word_embeddings: bool = True, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


@dataclass
class LSTMOutput(ModelOutput):
    logits: torch.Tensor | None = None
    state: tuple[torch.Tensor, torch.Tensor] | None = None
    """(h, c), each (num_layers, batch, hidden): the recurrence after the last input token."""


class LSTMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LSTMConfig
    base_model_prefix = "lstm"
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}

    def __init__(self, config: LSTMConfig):
        super().__init__(config)
        h = config.hidden_size
        self.embed_tokens = torch.nn.Embedding(config.vocab_size, h)
        self.lstm = torch.nn.LSTM(h, h, num_layers=config.num_hidden_layers, batch_first=True)
        self.lm_head = torch.nn.Linear(h, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (torch.nn.Embedding, torch.nn.Linear)):
            torch.nn.init.normal_(module.weight, std=std)
        elif isinstance(module, torch.nn.LSTM):
            for name, p in module.named_parameters():
                if name.startswith("weight"):
                    torch.nn.init.normal_(p, std=std)
                else:  # biases: forget gate (second quarter) at 1, the usual start for LSTM LMs
                    torch.nn.init.zeros_(p)
                    with torch.no_grad():
                        p[p.numel() // 4: p.numel() // 2] = 1.0

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                state: tuple[torch.Tensor, torch.Tensor] | None = None, use_cache: bool = False,
                **kwargs) -> LSTMOutput:
        """Logits (B, T, V) for input_ids (B, T); `state` continues an earlier call (generation).
        Other keyword arguments (position_ids of packed rows, ...) mean nothing to a recurrence."""
        x = self.embed_tokens(input_ids)
        if attention_mask is not None and state is None and not self.training:
            out, state = self._run_real_tokens(x, attention_mask)
        else:
            out, state = self.lstm(x, state)
        return LSTMOutput(logits=self.lm_head(out), state=state if use_cache else None)

    def _run_real_tokens(self, x: torch.Tensor, attention_mask: torch.Tensor):
        """The LSTM over each row's real tokens only (a contiguous run, padded left or right): they are moved
        to the front, run packed, and the outputs moved back; pad positions get zeros."""
        batch, width = attention_mask.shape
        lengths = attention_mask.sum(dim=1)
        first = attention_mask.argmax(dim=1)  # where each row's real tokens start
        positions = torch.arange(width, device=x.device)
        to_front = (positions[None, :] + first[:, None]) % width  # (B, T): source position of each slot
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            x.gather(1, to_front[..., None].expand_as(x)), lengths.clamp(min=1).cpu(), batch_first=True,
            enforce_sorted=False)
        out, state = self.lstm(packed)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=width)
        back = (positions[None, :] - first[:, None]) % width
        return out.gather(1, back[..., None].expand_as(out)), state

    # Generation: the state is the cache (transformers' DynamicCache holds attention keys and values).
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      state=None, **kwargs) -> dict:
        if state is not None:  # the prompt (and every earlier token) is in the state already
            return {"input_ids": input_ids[:, -1:], "state": state, "use_cache": True}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": True}

    def _update_model_kwargs_for_generation(self, outputs: LSTMOutput, model_kwargs: dict, *args, **kwargs) -> dict:
        model_kwargs["state"] = outputs.state
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)


# So that AutoConfig / AutoModelForCausalLM read an exported folder (megatrain's own readers use them).
AutoConfig.register(LSTMConfig.model_type, LSTMConfig, exist_ok=True)
AutoModelForCausalLM.register(LSTMConfig, LSTMForCausalLM, exist_ok=True)
