"""Which layers are MoE, and parameter and FLOP counts, from the config alone."""
from moejax import config as config_lib


def is_moe_layer(cfg, i: int) -> bool:
    """Every moe_every-th FFN is an MoE block, counting from 1 (Switch: layers 2, 4, ...), except
    the layers listed in model.dense_layers (Qwen-MoE's mlp_only_layers). The MTP modules'
    blocks count as layers num_layers, num_layers + 1, ..."""
    m = cfg.model
    return (m.moe_every > 0 and (i + 1) % m.moe_every == 0
            and i not in config_lib.dense_layers(cfg))


def attention_params(cfg) -> int:
    """One block's attention weights and its two norms."""
    m = cfg.model
    D, H = m.d_model, m.num_heads
    if m.attention_kind == 'mla':
        Q, C = m.q_lora_rank, m.kv_lora_rank
        K, U = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
        query = D * Q + Q + Q * H * K if Q else D * H * K
        return query + D * (C + m.qk_rope_head_dim) + C + C * H * (m.qk_nope_head_dim + U) \
            + H * U * D + 2 * D
    head_dim = config_lib.head_dim(cfg)
    kv = m.num_kv_heads or H
    attn = D * head_dim * (2 * H + 2 * kv) + 2 * D
    if m.qkv_bias:
        attn += head_dim * (H + 2 * kv)
    if m.qk_norm:
        attn += 2 * head_dim
    return attn


def param_counts(cfg) -> dict[str, int]:
    """Total and active (per token) parameters, counted from the config alone; the MTP modules'
    (model.mtp_depth, training only) are in both."""
    m, e = cfg.model, cfg.moe
    D, F, V = m.d_model, m.d_ff, cfg.data.vocab_size
    depth = m.mtp_depth
    L = m.num_layers + depth  # MTP blocks are blocks too
    per_ffn = lambda width: (3 if m.activation == 'swiglu' else 2) * D * width
    expert = per_ffn(config_lib.expert_d_ff(cfg))
    n_moe = sum(is_moe_layer(cfg, i) for i in range(L))
    router = D * e.num_experts * (2 if e.router == 'noisy_top_k' else 1)
    shared_width = config_lib.shared_d_ff(cfg)
    shared = per_ffn(shared_width) + (D if shared_width and e.shared_gate else 0)
    total = (2 * V * D + D + L * attention_params(cfg) + (L - n_moe) * per_ffn(F)
             + n_moe * (e.num_experts * expert + router + shared) + depth * (3 * D + 2 * D * D))
    experts_per_token = e.num_experts if e.router == 'soft' else e.top_k
    active = total - n_moe * (e.num_experts - experts_per_token) * expert
    return {'params': total, 'active_params': active, 'embedding_params': V * D}


def flops_per_token(cfg) -> float:
    """Training FLOPs per token, counted as MaxText does: 6 x active matmul params (the output
    projection included, once more per MTP depth, the embedding lookup not) + attention's two
    T x T matmuls (QK^T and weights x V: 2*T*H*(K + K_v) per token forward), causal at half,
    x3 for the backward pass."""
    m = cfg.model
    counts = param_counts(cfg)
    depth = m.mtp_depth
    matmul_params = (counts['active_params'] - counts['embedding_params']
                     + depth * counts['embedding_params'])
    if m.attention_kind == 'mla':
        qk_plus_v = m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim
    else:
        qk_plus_v = 2 * config_lib.head_dim(cfg)
    causal_attn = 2 * cfg.data.seq_len * m.num_heads * qk_plus_v / 2
    return 6 * matmul_params + 3 * (m.num_layers + depth) * causal_attn
