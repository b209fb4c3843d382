"""DeepSeek-V3 (DeepSeek-AI 2024): 671B parameters, 37B active per token, the published shapes.

61 layers of d_model 7168, the first 3 dense (SwiGLU d_ff 18432), the rest MoE: 256 routed
SwiGLU experts of d_ff 2048 plus 1 shared, top-8 by sigmoid scores within the 4 best of 8
expert groups, gates renormalised and scaled by 2.5, loss-free bias balancing (1e-3) with the
1e-4 sequence-wise balance loss, dropless. Multi-head latent attention: 128 heads, queries
through a 1536 rank, keys/values from a 512-channel latent, 128 no-rotary + 64 rotary q/k
channels, 128 value channels; YaRN to 128K (factor 40 over 4096, beta 32/1, mscale 1/1). One
multi-token prediction module (weight 0.3). Vocabulary 129280, sequences of 4096.
Layout for 256 chips: experts over 64 (4 per chip, DeepSeek-V3's EP64), everything else
fully sharded over fsdp 4, each block rematerialised; the 3 dense layers unrolled, the 58 MoE
layers scanned (one compiled period). Import the published weights with
`python launch/convert.py --from_hf=DeepSeek-V3 --workdir=DIR --config=configs/deepseek_v3_671b.py`
(FP8 dequantised). The plan's memory per device: docs/deepseek_v3.md (Recipes).
COMMAND: python launch/train.py --config=configs/deepseek_v3_671b.py --workdir=DIR
PLAN:    python launch/train.py --config=configs/deepseek_v3_671b.py --dry_run \
             --simulated_devices=256
"""
from configs import default


def get_config(arg: str | None = None):
    cfg = default.get_config('wide')  # keys not set here: the capacity-routed layout
    cfg.model.update(d_model=7168, num_layers=61, num_heads=128, num_kv_heads=0, d_ff=18432,
                     max_len=4096, dtype='bfloat16', moe_every=1, activation='swiglu',
                     dense_layers=[0, 1, 2], rope_base=10_000.0, attention_kind='mla',
                     q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128, rope_scaling='yarn', rope_factor=40.0,
                     rope_original_max_len=4096, rope_beta_fast=32.0, rope_beta_slow=1.0,
                     rope_mscale=1.0, rope_mscale_all_dim=1.0, mtp_depth=1,
                     mtp_loss_weight=0.3, remat='block', scan_layers=True)
    cfg.moe.update(num_experts=256, top_k=8, expert_d_ff=2048, num_shared_experts=1,
                   dispatch='dropless', comm='auto', ep_buffer_factor=1.25, score_fn='sigmoid',
                   gate_norm='renorm', routed_scaling_factor=2.5, num_expert_groups=8,
                   top_expert_groups=4, balance='bias', bias_update_rate=1e-3,
                   aux_loss_weight=0.0, z_loss_weight=0.0, seq_aux_loss_weight=1e-4)
    cfg.mesh.update(data=1, fsdp=4, expert=64, tensor=1)
    cfg.data.update(vocab_size=129280, seq_len=4096, batch_size=256)
    cfg.opt.update(lr=2.2e-4, warmup_steps=2_000, b2=0.95, weight_decay=0.1)
    cfg.train.update(num_steps=500_000, log_every=10, eval_every=2_000, checkpoint_every=1_000)
    return cfg
