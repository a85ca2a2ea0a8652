"""The small neural bigram language model of MixCE's synthetic experiments.

Q(· | x_{t-1}) = softmax(W · E[x_{t-1}]): an embedding followed by a linear output layer, so
the next-token distribution depends on the previous token only — the model family of the
true chain.  With ``hidden_size ≥ vocab_size`` (the default, ``hidden_size=None``) every
table of full-support rows is representable, so what separates objectives is the objective,
not capacity.

It is a ``transformers`` causal LM (``PreTrainedModel`` + ``GenerationMixin``): the
``ObjectiveTrainer`` can train it, ``generate`` samples from it, ``resize_token_embeddings``
works (SequenceMatch adds a token), and objectives that read the output embedding (EMO) find
it with ``get_output_embeddings``.  ``attention_mask`` (2-D or 4-D), ``position_ids`` and
``past_key_values`` are accepted and ignored: a bigram has no attention, so SequenceMatch's
one-pass backspace trees and its cache-threading sampler work unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["BigramConfig", "BigramLM"]


class BigramConfig(PretrainedConfig):
    """Config of :class:`BigramLM`.

    Args:
        vocab_size: input and output vocabulary (for a known-P language: ``V + 3``).
        hidden_size: embedding width; ``None`` means ``vocab_size`` (full rank).
        initializer_range: std of the normal initialisation (small ⇒ near-uniform initial Q).
    """

    model_type = "known_p_bigram"

    def __init__(
        self,
        vocab_size: int = 23,
        hidden_size: int | None = None,
        initializer_range: float = 0.02,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size if hidden_size is not None else vocab_size
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)


class BigramLM(PreTrainedModel, GenerationMixin):
    """Embedding → linear (no bias): logits at position t depend on ``input_ids[:, t]`` only."""

    config_class = BigramConfig
    base_model_prefix = "bigram"
    main_input_name = "input_ids"
    _supports_cache_class = False

    def __init__(self, config: BigramConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if self.generation_config is not None:
            self.generation_config.use_cache = False  # nothing to cache

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Embedding, nn.Linear)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed(input_ids)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # Plain next-token CE (HF convention: labels unshifted, −100 ignored).
            shifted = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1))
        # past_key_values is always None: a bigram needs no cache, and samplers that thread a
        # cache through (the backspace-aware one) just feed the next token again.
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=None, hidden_states=(hidden,) if output_hidden_states else None
        )

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No cache: the last token is all a bigram needs.
        return {"input_ids": input_ids[:, -1:]}


def _register_auto_classes() -> None:
    """Let ``AutoConfig``/``AutoModelForCausalLM`` load saved bigram checkpoints (once per process)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(BigramConfig.model_type, BigramConfig)
        AutoModelForCausalLM.register(BigramConfig, BigramLM)
    except ValueError:  # already registered
        pass


_register_auto_classes()
