"""Switch-Base with 8 experts (Fedus et al. 2021), as a decoder-only LM.

T5-Base sized (d_model 768, 12 heads, d_ff 3072, 32k vocab); Switch-Base's encoder and decoder
stacks (12 + 12 layers) become one 24-layer decoder, experts in every other FFN, top-1 routing,
capacity factor 1.25, aux loss 1e-2. ~0.6B parameters (Switch-Base-8: 0.62B), ~0.2B active.
COMMAND: python launch/train.py --config=configs/switch_base_8.py --workdir=DIR
PLAN:    python launch/train.py --config=configs/switch_base_8.py --dry_run --simulated_devices=32
LAYOUTS: python launch/plan.py --config=configs/switch_base_8.py --devices=32 --device_memory=80GB
The 24 layers are scanned (model.scan_layers=None: auto, on from 8 layers) in periods of a dense
and an MoE block, so compile time does not grow with depth.
Variants: `:128` gives Switch-Base-128 (see switch_base_128.py).
"""
from configs import default


def get_config(arg: str | None = None):
    cfg = default.get_config('wide')  # keys not set here: the capacity-routed layout
    cfg.model.update(d_model=768, num_layers=24, num_heads=12, d_ff=3072, max_len=512,
                     dtype='bfloat16', moe_every=2, activation='gelu')
    cfg.moe.update(num_experts=int(arg or 8), top_k=1, capacity_factor=1.25,
                   eval_capacity_factor=2.0, dispatch='sort', jitter=0.01)
    # Experts over 8, the rest fsdp (4), no remat, the whole batch per step: the layout
    # launch/plan.py ranks first on 32 devices of 80 GB (docs/plans.md).
    cfg.mesh.update(data=1, fsdp=-1, expert=8)
    cfg.data.update(vocab_size=32128, seq_len=512, batch_size=256)
    cfg.opt.update(lr=1e-3, warmup_steps=10_000, schedule='rsqrt', weight_decay=0.0)
    cfg.train.update(num_steps=100_000, log_every=100, eval_every=5_000,
                     checkpoint_every=5_000)
    return cfg
