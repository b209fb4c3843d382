"""A ~1B-parameter MoE LM in bfloat16 for one 80 GB GPU (H100): the MFU benchmark recipe.

16 layers of d_model 1280 (20 heads of 64), SwiGLU FFNs of d_ff 3072; every other FFN is an MoE
block of 8 experts with top-2 dropless routing. 1.04B parameters, 0.47B active per token.
COMMAND: python launch/train.py --config=configs/moe_1b.py --workdir=DIR
PLAN:    python launch/train.py --config=configs/moe_1b.py --dry_run --simulated_devices=1
BENCH:   python benchmarks/train_step.py --config=configs/moe_1b.py
Variants (`--config=configs/moe_1b.py:VARIANT`):
    dense   the dense counterpart with the same active parameters: every FFN dense, d_ff 4608
            (= the MoE stack's 8 layers x 1 + 8 layers x 2 experts of 3072, spread evenly)
"""
from configs import default


def get_config(arg: str | None = None):
    cfg = default.get_config('wide')  # keys not set here: the capacity-routed layout
    cfg.model.update(d_model=1280, num_layers=16, num_heads=20, num_kv_heads=0, d_ff=3072,
                     max_len=2048, dtype='bfloat16', moe_every=2, activation='swiglu')
    cfg.moe.update(num_experts=8, top_k=2, capacity_factor=1.25, eval_capacity_factor=2.0,
                   dispatch='dropless', aux_loss_weight=1e-2, z_loss_weight=1e-3)
    cfg.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
    cfg.data.update(vocab_size=32000, seq_len=2048, batch_size=16)
    # One 80 GB GPU: the whole batch (16 rows, 32k tokens) as one micro-batch, every matmul
    # large and no accumulation loop; model.remat='minimal' keeps the plain weight matmuls'
    # outputs and recomputes the rest, so the step fits. The dry-run figures behind this
    # choice, and the alternatives that also fit: docs/plans.md.
    cfg.model.remat = 'minimal'
    cfg.opt.update(lr=3e-4, warmup_steps=2_000, weight_decay=0.1, grad_accum=1)
    cfg.train.update(num_steps=100_000, log_every=50, eval_every=2_000, checkpoint_every=2_000)
    if arg == 'dense':
        cfg.model.update(moe_every=0, d_ff=4608)
    elif arg:
        raise ValueError(f'configs/moe_1b.py: unknown variant {arg!r}; known: dense')
    return cfg
