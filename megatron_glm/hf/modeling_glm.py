"""GLM for ``transformers`` (remote code shipped with a megatron_glm export; ``trust_remote_code=True``).

Module and tensor names are the original GLM ones (THUDM's published layout): ``word_embeddings``,
``transformer.{position_embeddings, block_position_embeddings, layers.{i}.*, final_layernorm}``; the task
models hold a :class:`GLMModel` as ``glm`` and use the word embedding as their (tied) head.

The math is megatron_glm's training math: pre-LayerNorm layers with ``config.layernorm_epsilon``, fp32
attention softmax, GeLU with ``config.gelu_approximate`` (``"tanh"`` by default, as GLM was trained; THUDM's
own HF code uses the exact erf GeLU, so running these weights with their code is close but not exact).

Inputs (THUDM's semantics): ``input_ids [b, s]``; ``position_ids [b, 2, s]`` (position, block position;
default ``0..s-1`` and zeros); ``attention_mask`` one of: an int or a ``[b]`` tensor of ``sep`` (the length
of the bidirectional Part A: token ``i`` sees ``j`` when ``j < sep`` or ``j <= i``), a 0/1 ``[b, 1, s, s]``
mask (1 = attend; ``[b, 1, s, past + s]`` with a cache), a 0/1 ``[b, s]`` padding mask (causal, padded keys
hidden), or ``None`` (``sep = 0``: causal).

Generation (``GLMForConditionalGeneration.generate``) fills the first blank (``[MASK]``, ``[sMASK]`` or
``[gMASK]``) of Part A, GLM's way: the prompt is Part A followed by ``[sop]`` (rows padded between Part A and
``[sop]``, with a 0/1 padding ``attention_mask``; ``GLMTokenizer.build_inputs_for_generation`` builds it). Each
generated token takes the blank's position and block positions 2, 3, ... (``[sop]`` has 1), attends to all of
Part A and to the earlier answer tokens, and the keys/values are cached. Positions and masks are derived from
the tokens, so ``position_ids`` given to ``generate`` are ignored.

Self-contained: imports ``torch`` and ``transformers`` only (never ``megatron_glm``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_glm import GLMConfig

BLANK_TOKENS = ("[MASK]", "[sMASK]", "[gMASK]")


@dataclass
class GLMOutput(ModelOutput):
    """``logits [b, s, V]`` (the tied head), ``last_hidden_state [b, s, H]``, the key/value ``cache`` when one
    is used, the per-layer ``hidden_states`` on request and the ``loss`` when ``labels`` are given."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    cache: Any = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def attention_bool_mask(attention_mask: Any, batch: int, q_len: int, past: int, device: torch.device) -> torch.Tensor:
    """Any accepted ``attention_mask`` as a boolean ``[b, 1, q_len, past + q_len]`` (True = may attend)."""
    kv_len = past + q_len
    q = torch.arange(past, kv_len, device=device).view(1, 1, q_len, 1)
    k = torch.arange(kv_len, device=device).view(1, 1, 1, kv_len)
    if attention_mask is None:
        attention_mask = 0
    if isinstance(attention_mask, int):
        attention_mask = torch.full((batch,), attention_mask, dtype=torch.long, device=device)
    mask = attention_mask.to(device)
    if mask.dim() == 0:
        mask = mask.expand(batch)
    if mask.dim() == 1:
        if mask.is_floating_point() or mask.dtype == torch.bool:
            raise ValueError(f"a 1-D attention_mask holds integer sep values, got {mask.dtype}")
        return (k < mask.view(-1, 1, 1, 1)) | (k <= q)
    if mask.dim() == 2:
        if mask.shape[1] != kv_len:
            raise ValueError(f"a 2-D padding attention_mask must be [{batch}, {kv_len}], got {list(mask.shape)}")
        return (mask.bool().view(batch, 1, 1, kv_len) & (k <= q)) | (k == q)
    if mask.dim() == 4:
        if tuple(mask.shape[-2:]) != (q_len, kv_len):
            mask = mask[..., -q_len:, :kv_len]  # THUDM passes masks sized for the whole generation
        return mask.bool() if mask.dtype == torch.bool else mask > 0.5
    raise ValueError(f"attention_mask must be an int, [b], [b, s] or [b, 1, s, s], got {list(mask.shape)}")


class GLMSelfAttention(nn.Module):
    """Fused ``query_key_value`` (``[Q; K; V]`` over the rows), scaled dot product in fp32, ``dense`` output."""

    def __init__(self, config: GLMConfig, layer_idx: int) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads, self.head_dim, self.layer_idx = (
            config.num_attention_heads,
            h // config.num_attention_heads,
            layer_idx,
        )
        self.query_key_value = nn.Linear(h, 3 * h)
        self.dense = nn.Linear(h, h)
        self.attention_dropout = nn.Dropout(config.attention_dropout_prob)
        self.output_dropout = nn.Dropout(config.output_dropout_prob)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: Any = None) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = (torch.softmax(scores, dim=-1) * mask.any(dim=-1, keepdim=True)).to(v.dtype)
        ctx = torch.matmul(self.attention_dropout(probs), v).transpose(1, 2).reshape(b, s, -1)
        return self.output_dropout(self.dense(ctx))


class GLMMLP(nn.Module):
    """``dense_h_to_4h`` -> GeLU -> ``dense_4h_to_h`` -> dropout."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.approximate = config.gelu_approximate
        self.dense_h_to_4h = nn.Linear(h, 4 * h)
        self.dense_4h_to_h = nn.Linear(4 * h, h)
        self.dropout = nn.Dropout(config.output_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate)))


class GLMBlock(nn.Module):
    """``h = h + Attn(LN1(h)); h = h + MLP(LN2(h))``."""

    def __init__(self, config: GLMConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.attention = GLMSelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        self.mlp = GLMMLP(config)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, cache: Any = None) -> torch.Tensor:
        h = h + self.attention(self.input_layernorm(h), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class GLMStack(nn.Module):
    """Position tables (``max_sequence_length + 1`` rows), the layers and the final LayerNorm."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__()
        h, rows = config.hidden_size, config.max_sequence_length + 1
        self.block_position_encoding = config.block_position_encoding
        self.embedding_dropout = nn.Dropout(config.embedding_dropout_prob)
        self.position_embeddings = nn.Embedding(rows, h)
        if config.block_position_encoding:
            self.block_position_embeddings = nn.Embedding(rows, h)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(h, eps=config.layernorm_epsilon)

    def forward(
        self, word: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache: Any, all_hidden: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        h = word + self.position_embeddings(position_ids[:, 0])
        if self.block_position_encoding:
            h = h + self.block_position_embeddings(position_ids[:, 1])
        h = self.embedding_dropout(h)
        states = [] if all_hidden else None
        for layer in self.layers:
            if states is not None:
                states.append(h)
            h = layer(h, mask, cache)
        h = self.final_layernorm(h)
        if states is not None:
            states.append(h)
        return h, tuple(states) if states is not None else None


class GLMPreTrainedModel(PreTrainedModel):
    """Shared loading and initialisation (N(0, initializer_range) weights, zero biases, unit LayerNorms)."""

    config_class = GLMConfig
    base_model_prefix = "glm"
    _no_split_modules = ["GLMBlock"]  # noqa: RUF012 (read by transformers as a class attribute)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


def default_position_ids(input_ids: torch.Tensor, past: int) -> torch.Tensor:
    """Positions ``past .. past + s - 1`` and block positions 0: ``[b, 2, s]``."""
    b, s = input_ids.shape
    pos = torch.arange(past, past + s, device=input_ids.device).expand(b, s)
    return torch.stack([pos, torch.zeros_like(pos)], dim=1)


class GLMModel(GLMPreTrainedModel):
    """The GLM stack; ``logits`` (tied head) are computed when ``config.output_predict``."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.transformer = GLMStack(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
        cache: Any = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> GLMOutput:
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(input_ids, past)
        if position_ids.dim() != 3 or position_ids.shape[1] != 2:
            raise ValueError(
                f"position_ids must be [b, 2, s] (position, block position), got {list(position_ids.shape)}"
            )
        b, s = input_ids.shape
        mask = attention_bool_mask(attention_mask, b, s, past, input_ids.device)
        h, states = self.transformer(
            self.word_embeddings(input_ids), position_ids, mask, cache, bool(output_hidden_states)
        )
        logits = F.linear(h, self.word_embeddings.weight) if self.config.output_predict else None
        return GLMOutput(logits=logits, last_hidden_state=h, cache=cache, hidden_states=states)


class GLMForConditionalGeneration(GLMPreTrainedModel, GenerationMixin):
    """GLM with its tied language-model head: blank infilling (``generate``) and the masked LM loss."""

    def __init__(self, config: GLMConfig) -> None:
        super().__init__(config)
        self.glm = GLMModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.glm.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.glm.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
        labels: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> GLMOutput:
        """``labels [b, s]``: target ids, -100 where no loss is taken (mean over the others)."""
        out = self.glm(
            input_ids,
            position_ids,
            attention_mask,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        logits = (
            out.logits if out.logits is not None else F.linear(out.last_hidden_state, self.glm.word_embeddings.weight)
        )
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return GLMOutput(
            loss=loss,
            logits=logits,
            last_hidden_state=out.last_hidden_state,
            cache=out.cache,
            hidden_states=out.hidden_states,
        )

    def _token_id(self, text: str) -> int:
        ids = getattr(self.generation_config, "glm_command_tokens", None) or getattr(
            self.config, "glm_command_tokens", None
        )
        if not ids or text not in ids:
            raise ValueError(
                f"generate needs the id of {text}: the config lacks glm_command_tokens (export the model with "
                f"megatron_glm's tools/convert_checkpoint.py --format hf and a tokenizer)"
            )
        return int(ids[text])

    def infill_layout(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """``(A, a_lens, blanks)``: the ``[sop]`` column (Part A padded to ``A``), each row's Part A length and
        the position of its first blank."""
        sop = self._token_id("[sop]")
        hits = (input_ids[0] == sop).nonzero()
        if hits.numel() == 0:
            raise ValueError("generate: the prompt must be Part A followed by [sop] (see build_inputs_for_generation)")
        a = int(hits[0])
        if not bool((input_ids[:, a] == sop).all()):
            raise ValueError(f"generate: every row needs its [sop] at column {a} (pad Part A, not after [sop])")
        if attention_mask is not None and attention_mask.dim() == 2:
            a_lens = attention_mask[:, :a].long().sum(dim=1)
        else:
            a_lens = torch.full((input_ids.shape[0],), a, dtype=torch.long, device=input_ids.device)
        cols = torch.arange(a, device=input_ids.device).view(1, a)
        blank_ids = torch.tensor([self._token_id(t) for t in BLANK_TOKENS], device=input_ids.device)
        is_blank = torch.isin(input_ids[:, :a], blank_ids) & (cols < a_lens.view(-1, 1))
        if not bool(is_blank.any(dim=1).all()):
            raise ValueError("generate: every prompt needs a blank ([MASK], [sMASK] or [gMASK]) before [sop]")
        blanks = torch.where(is_blank, cols, a).min(dim=1).values
        return a, a_lens, blanks

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        next_sequence_length: int | None = None,
        cache: Any = None,
        attention_mask: Any = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """GLM's Part B positions and mask for the tokens not yet in the cache (see the module docstring)."""
        a, a_lens, blanks = self.infill_layout(input_ids, attention_mask if torch.is_tensor(attention_mask) else None)
        b, total = input_ids.shape
        device = input_ids.device
        past = cache.get_seq_length() if cache is not None else 0
        cols = torch.arange(total, device=device).view(1, total)
        real_a = cols < a_lens.view(-1, 1)
        pos = torch.where(cols < a, torch.where(real_a, cols, 0), blanks.view(-1, 1))
        block = torch.where(cols < a, 0, cols - a + 1)
        position_ids = torch.stack([pos, block.expand(b, total)], dim=1)
        q = torch.arange(past, total, device=device).view(1, 1, -1, 1)
        k = cols.view(1, 1, 1, total)
        mask = (k < a_lens.view(-1, 1, 1, 1)) | ((k >= a) & (k <= q)) | (k == q)
        return {
            "input_ids": input_ids[:, past:],
            "position_ids": position_ids[:, :, past:],
            "attention_mask": mask,
            "cache": cache,
            "use_cache": use_cache,
        }


class GLMForMultipleChoice(GLMPreTrainedModel):
    """Scores candidate answers: the summed log-probability of each choice's tokens.

    ``choice_ids`` and ``choice_indices`` are ``[b, c, L]``: choice ``j``'s token ids and the positions whose
    next-token distribution predicts them (-100 pads both). ``logits`` are ``[b, c]``; with ``labels [b]`` the
    loss is the cross entropy over the choices.
    """

    def __init__(self, config: GLMConfig) -> None:
        super().__init__(config)
        self.glm = GLMModel(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
        choice_ids: torch.Tensor | None = None,
        choice_indices: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> GLMOutput:
        if choice_ids is None or choice_indices is None:
            raise ValueError("GLMForMultipleChoice needs choice_ids and choice_indices ([b, choices, L])")
        out = self.glm(input_ids, position_ids, attention_mask)
        logits = (
            out.logits if out.logits is not None else F.linear(out.last_hidden_state, self.glm.word_embeddings.weight)
        )
        logp = torch.log_softmax(logits.float(), dim=-1)
        b, c, n = choice_ids.shape
        valid = choice_ids >= 0
        rows = logp.gather(1, choice_indices.clamp(min=0).view(b, c * n, 1).expand(-1, -1, logp.shape[-1]))
        token_logp = rows.gather(2, choice_ids.clamp(min=0).view(b, c * n, 1)).view(b, c, n)
        scores = (token_logp * valid).sum(dim=-1)
        loss = F.cross_entropy(scores, labels) if labels is not None else None
        return GLMOutput(loss=loss, logits=scores, last_hidden_state=out.last_hidden_state)
