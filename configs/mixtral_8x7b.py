"""Mixtral 8x7B (Jiang et al. 2024): 46.7B parameters, 12.9B active per token.

32 layers of d_model 4096, 32 query / 8 key-value heads, SwiGLU experts of d_ff 14336, 8
experts in every layer, top-2 routing, dropless as Mixtral is (the ragged expert exchange,
moe.ep_buffer_factor 1.25), rope base 1e6, 32k vocab. Layout for 64 chips: experts over 8,
everything else fully sharded (fsdp 8), each block rematerialised, the 32 layers scanned (one
compiled block). Plans and their measured bytes per device: docs/plans.md.
COMMAND: python launch/train.py --config=configs/mixtral_8x7b.py --workdir=DIR
PLAN:    python launch/train.py --config=configs/mixtral_8x7b.py --dry_run --target=tpu-v5p --devices=64
LAYOUTS: python launch/plan.py --config=configs/mixtral_8x7b.py --target=tpu-v5p --devices=64
"""
from configs import default


def get_config(arg: str | None = None):
    cfg = default.get_config('wide')  # keys not set here: the capacity-routed layout
    cfg.model.update(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, d_ff=14336,
                     max_len=4096, dtype='bfloat16', moe_every=1, activation='swiglu',
                     rope_base=1e6)
    cfg.model.remat = 'block'
    cfg.model.scan_layers = True
    cfg.moe.update(num_experts=8, top_k=2, dispatch='dropless', comm='auto', ep_buffer_factor=1.25,
                   aux_loss_weight=1e-2, z_loss_weight=1e-3)
    cfg.mesh.update(data=1, fsdp=-1, expert=8, tensor=1)
    cfg.data.update(vocab_size=32000, seq_len=4096, batch_size=64)
    cfg.opt.update(lr=3e-4, warmup_steps=2_000, b2=0.95, weight_decay=0.1)
    cfg.train.update(num_steps=250_000, log_every=10, eval_every=2_000, checkpoint_every=1_000)
    return cfg
