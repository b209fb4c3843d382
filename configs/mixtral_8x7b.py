"""Mixtral 8x7B (Jiang et al. 2024): 46.7B parameters, 12.9B active per token.

32 layers of d_model 4096, 32 query / 8 key-value heads, SwiGLU experts of d_ff 14336, 8
experts in every layer, top-2 routing, rope base 1e6, 32k vocab.
Layout for 64 chips of 80 GB: experts over 8, everything else fully sharded (fsdp 8), tokens
exchanged by all_to_all into capacity buffers (factor 1.25), each block rematerialised, the 32
layers scanned (one compiled block) and attention chunked (model.attention=auto on CPU; flash on
GPU). The dry run on 64 simulated devices: 3.6 GB params + 7.2 GB Adam + 11.2 GB temporaries =
22 GB per device at seq_len 4096, one sequence per device. launch/plan.py ranks this layout
among those that fit (fsdp 8 x tensor 8 is estimated ~10% faster, within the estimate's error;
expert parallelism keeps expert weights whole on their device and needs no tensor all-reduce).
Mixtral itself is dropless; `--config.moe.dispatch=dropless` with comm=all_to_all is exact and
expert-parallel (capacity = group size: E/k-times larger buffers).
COMMAND: python launch/train.py --config=configs/mixtral_8x7b.py --workdir=DIR
PLAN:    python launch/train.py --config=configs/mixtral_8x7b.py --dry_run --simulated_devices=64
LAYOUTS: python launch/plan.py --config=configs/mixtral_8x7b.py --devices=64 --device_memory=80GB
"""
from configs import default


def get_config(arg: str | None = None):
    cfg = default.get_config('wide')  # keys not set here: the capacity-routed layout
    cfg.model.update(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, d_ff=14336,
                     max_len=4096, dtype='bfloat16', moe_every=1, activation='swiglu',
                     rope_base=1e6)
    cfg.model.remat = 'block'
    cfg.model.scan_layers = True
    cfg.moe.update(num_experts=8, top_k=2, dispatch='sort', comm='all_to_all',
                   capacity_factor=1.25, eval_capacity_factor=2.0, aux_loss_weight=1e-2,
                   z_loss_weight=1e-3)
    cfg.mesh.update(data=1, fsdp=-1, expert=8, tensor=1)
    cfg.data.update(vocab_size=32000, seq_len=4096, batch_size=64)
    cfg.opt.update(lr=3e-4, warmup_steps=2_000, b2=0.95, weight_decay=0.1)
    cfg.train.update(num_steps=250_000, log_every=10, eval_every=2_000, checkpoint_every=1_000)
    return cfg
