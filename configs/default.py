"""Default recipe: a small Switch-style MoE LM that trains on a 2-core CPU in minutes.

COMMAND: python launch/train.py --config=configs/default.py --workdir=/tmp/moejax_default
4 layers of d_model 64; every FFN an MoE of 8 experts (d_ff 256), top-1, dropless, each sequence
routed alone; inverse-square-root schedule (no final anneal: a run extends by raising
train.num_steps); 800 steps of 32 x 128 tokens of the embedded corpus. The expert-scaling study
chose this recipe, and its measurements are in docs/expert_scaling.md.
Variants (`--config=configs/default.py:VARIANT`, comma-separated to combine):
    dense   the same model with dense FFNs only (moe_every=0)
    gshard  top-2 routing (GShard)
    fine    fine-grained experts, granularity 4 (docs/granularity.md): 128 experts of d_ff / 4,
            top-4: the dense FFN's active and 32 Switch experts' total parameters
    wide    the default until the expert-scaling study: d_model 128, d_ff 512, MoE in every
            other FFN, capacity routing (sort, 1.25) over one sequence, cosine, 300 steps; the
            large recipes in configs/ and `tiny` build on it
    tiny    a seconds-long smoke run (used by tests)
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()

    cfg.model = m = ml_collections.ConfigDict()
    m.d_model = 64            # width of the residual stream
    m.num_layers = 4          # Transformer blocks
    m.num_heads = 4           # attention heads (d_model must divide by it)
    m.num_kv_heads = 0        # grouped-query attention: K/V heads; 0 = num_heads
    m.d_ff = 256              # hidden width of each FFN (dense) and of each expert
    m.max_len = 128           # longest sequence the model accepts (>= data.seq_len)
    m.dtype = 'float32'       # activations and matmuls: 'float32' | 'bfloat16' (params stay float32)
    m.moe_every = 1           # every n-th FFN is an MoE block (Switch: every other); 0 = dense
    m.activation = 'gelu'     # FFN nonlinearity: 'gelu' | 'swiglu'
    m.rope_base = 10_000.0    # rotary embedding base frequency
    m.remat = 'none'          # 'block': recompute each block in the backward pass (less memory);
                              # 'minimal': also keep weight-matmul outputs (less recompute)
    # One compiled period scanned over the layers (compile time independent of depth): True |
    # False | None = scan when num_layers >= 8 and no dense_layers. True keeps dense_layers that
    # are the first k layers (DeepSeek) unrolled before the scan. The saved parameter trees differ.
    m.scan_layers = ml_collections.FieldReference(None, field_type=bool)
    m.attention = 'auto'      # 'auto' | 'xla' | 'chunked' (O(T*block) memory) | 'flash' (GPU/TPU)
    m.attention_block = 128   # 'chunked': queries/keys per block (memory O(T * block))
    m.norm_eps = 1e-6         # RMSNorm epsilon (Mixtral 1e-5)
    m.head_dim = 0            # channels per head; 0 = d_model / num_heads (Qwen3: set apart)
    m.qk_norm = False         # RMSNorm on each head's queries and keys (Qwen3)
    m.qkv_bias = False        # biases on the q/k/v projections (Qwen2)
    m.dense_layers = []       # layers kept dense whatever moe_every says (Qwen mlp_only_layers)
    m.attention_kind = 'mha'  # 'mha' (rotary GQA) | 'mla' (DeepSeek multi-head latent attention)
    m.q_lora_rank = 0         # mla: rank of the low-rank query projection; 0 = a full-rank query
    m.kv_lora_rank = 0        # mla: width of the compressed key-value latent (the KV cache)
    m.qk_nope_head_dim = 0    # mla: per-head query/key channels without rotary
    m.qk_rope_head_dim = 0    # mla: per-head query/key channels with rotary (key shared by heads)
    m.v_head_dim = 0          # mla: per-head value channels
    m.rope_scaling = 'none'   # 'none' | 'yarn' (mla: YaRN context extension, DeepSeek-V3)
    m.rope_factor = 1.0       # yarn: context extension factor (DeepSeek-V3: 40)
    m.rope_original_max_len = 4096  # yarn: the pretraining context length
    m.rope_beta_fast = 32.0   # yarn: wavelength ramp bound, fast end (rotations per context)
    m.rope_beta_slow = 1.0    # yarn: wavelength ramp bound, slow end
    m.rope_mscale = 1.0       # yarn: cos/sin scale 0.1*mscale*ln(factor)+1 over the all-dim one
    m.rope_mscale_all_dim = 0.0  # yarn: softmax scale x (0.1*this*ln(factor)+1)^2; 0 = none
    m.mtp_depth = 0           # multi-token prediction modules (DeepSeek-V3: 1); 0 = off
    m.mtp_loss_weight = 0.3   # the MTP loss weight lambda, over the mean of the depths' losses

    cfg.moe = e = ml_collections.ConfigDict()
    e.num_experts = 8                # routed experts per MoE block
    e.router = 'top_k'               # 'top_k' | 'noisy_top_k' | 'expert_choice' | 'soft'
    e.top_k = 1                      # experts per token (Switch 1, GShard 2)
    e.capacity_factor = 1.25         # training: slots per expert = ceil(S*k*cf/E); <= 0: no drops
    e.eval_capacity_factor = 2.0     # evaluation capacity factor (<= 0: no drops)
    e.group_size = 0                 # tokens routed together; 0 = one sequence per group
    e.dispatch = 'dropless'          # 'einsum' (reference) | 'sort' (capacity) | 'dropless'
    e.comm = 'auto'                  # expert-parallel exchange: 'auto' (dropless: ragged rows;
                                     # capacity: GSPMD) | 'gspmd' | 'all_to_all' (explicit)
    e.ep_buffer_factor = 1.25        # ragged exchange: receive buffer = factor x the rows a
                                     # balanced router sends; rows past it drop; <= 0: worst case
    e.grouped_matmul = 'auto'        # dropless grouped matmul: 'auto' (CPU: 'blocks'; GPU/TPU:
                                     # 'tokamax' if installed, else 'ragged_dot') | 'blocks' (CPU
                                     # block loops) | 'ragged_dot' (jax.lax) | 'tokamax' (kernels)
    e.expert_d_ff = 0                # hidden width of each routed expert; 0 = model.d_ff
    e.num_shared_experts = 0         # always-on experts beside the routed ones (DeepSeek-MoE)
    e.shared_d_ff = 0                # their FFN's width; 0 = num_shared_experts * expert width
    e.shared_gate = False            # scale the shared output by sigmoid(x @ w) (Qwen2-MoE)
    e.balance = 'aux_loss'           # 'aux_loss' | 'bias' (loss-free, DeepSeek-V3) | 'none'
    e.aux_loss_weight = 1e-2         # load-balancing loss weight (Switch: 1e-2)
    e.seq_aux_loss_weight = 0.0      # sequence-wise balance loss weight (DeepSeek-V3: 1e-4)
    e.z_loss_weight = 1e-3           # router z-loss weight (ST-MoE: 1e-3)
    e.jitter = 0.0                   # multiplicative router-input noise in training (Switch: 0.01)
    # Router conventions of peers (README "Routing and peer conventions"):
    e.score_fn = 'softmax'           # top_k scores: 'softmax' | 'sigmoid' (DeepSeek-V3)
    e.gate_norm = 'auto'             # top_k gates: 'auto' (renormalised if k>1) | 'raw' | 'renorm'
    e.routed_scaling_factor = 1.0    # top_k gates are multiplied by it (DeepSeek-V3: 2.5)
    e.num_expert_groups = 0          # > 0: group-limited top_k (DeepSeek-V3 n_group); 0 = off
    e.top_expert_groups = 0          # groups each token may use (DeepSeek-V3 topk_group)
    e.batch_prioritized = False      # capacity slots by router score, not position (V-MoE BPR);
                                     # in a decoder later tokens can take earlier ones' slots
    e.capacity_rule = 'gshard'       # 'gshard': ceil(S*k*cf/E) | 't5x': round(cf*S/E), no k
    e.min_capacity = 1               # fewest slots per expert (T5X min_expert_capacity: 4)
    e.aux_loss_norm = 'assignments'  # aux f_e over k*n assignments (uniform: 1) | 'tokens' (over n
                                     # tokens, uniform: k; T5X, MaxText, HF Mixtral)
    e.bias_update_rate = 1e-3        # balance='bias': per-step bias change toward uniform load

    cfg.mesh = ml_collections.ConfigDict()
    cfg.mesh.data = -1               # -1 = all remaining devices
    cfg.mesh.fsdp = 1
    cfg.mesh.expert = 1
    cfg.mesh.tensor = 1

    cfg.data = d = ml_collections.ConfigDict()
    d.name = 'python_stdlib'         # 'python_stdlib' | 'text_files' | a prepared TFDS name
    d.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: ~/tensorflow_datasets
    d.text_glob = ''                 # text_files: which files
    d.text_format = 'files'          # text_files: 'files' (doc per file) | 'lines' (doc per line)
    d.text_key = 'text'              # TFDS: the text feature
    d.tokenizer = 'sentencepiece'    # 'sentencepiece' | 'byte' | 'hf' (a HF tokenizer.json)
    # A .model to load (sentencepiece), or a tokenizer.json or HF model dir (hf); None: train one.
    d.tokenizer_path = ml_collections.FieldReference(None, field_type=str)
    d.vocab_size = 2048              # tokenizer and embedding size (byte: >= 259)
    d.seq_len = 128                  # tokens per packed row
    d.batch_size = 32                # global batch, rows
    d.eval_batches = 8               # batches per evaluation

    cfg.opt = o = ml_collections.ConfigDict()
    o.name = 'adamw'                 # 'adamw' | 'adafactor'
    o.lr = 3e-3                      # peak learning rate
    o.schedule = 'rsqrt'             # 'cosine' | 'rsqrt' | 'constant' (each after linear warmup)
    o.warmup_steps = 50
    o.weight_decay = 0.1             # decoupled; not applied to norms, biases or embeddings
    o.b1 = 0.9
    o.b2 = 0.95
    o.clip_norm = 1.0                # global gradient norm clip; 0 = off
    o.grad_accum = 1                 # micro-batches per step (batch_size must divide by it)

    cfg.train = t = ml_collections.ConfigDict()
    t.num_steps = 800
    t.seed = 0
    t.log_every = 10
    t.eval_every = 100               # 0 = only at the end
    t.checkpoint_every = 100
    t.keep_checkpoints = 3
    t.max_skipped_steps = 10         # skipped steps in a row before the run stops
    t.spike_factor = 10.0            # skip a step whose loss > this x the mean of the last 16
                                     # applied losses, like a non-finite one; 0 = off

    _apply_variant(cfg, arg)
    return cfg


def _apply_variant(cfg, arg):
    if not arg:
        return
    # wide and tiny set a whole layout, so they go first whatever the order given; dense and
    # gshard then change it
    for variant in sorted(arg.split(','), key=lambda v: v not in ('wide', 'tiny')):
        if variant == 'dense':
            cfg.model.moe_every = 0
        elif variant == 'gshard':
            cfg.moe.top_k = 2
        elif variant == 'fine':
            cfg.moe.update(num_experts=128, top_k=4, expert_d_ff=cfg.model.d_ff // 4)
        elif variant == 'wide':
            # The default before the expert-scaling study (docs/expert_scaling.md).
            cfg.model.update(d_model=128, d_ff=512, moe_every=2)
            cfg.moe.dispatch = 'sort'
            cfg.opt.schedule = 'cosine'
            cfg.train.num_steps = 300
        elif variant == 'tiny':
            _apply_variant(cfg, 'wide')  # tiny shapes on the capacity-routed layout
            cfg.model.update(d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=32)
            cfg.moe.num_experts = 4
            cfg.data.update(tokenizer='byte', vocab_size=259, seq_len=32, batch_size=8, eval_batches=2)
            cfg.train.update(num_steps=10, log_every=2, eval_every=5, checkpoint_every=5)
            cfg.opt.warmup_steps = 2
        else:
            raise ValueError(f'configs/default.py: unknown variant {variant!r}; '
                                              'known: dense, gshard, fine, wide, tiny')
