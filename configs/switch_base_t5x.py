"""Switch-Base with T5X/flaxformer routing conventions (flaxformer's switch_base.gin), decoder-only.

configs/switch_base_8.py's model (T5-Base sized, experts in every other FFN, top-1), routed the
way T5X routes it, so the published hyper-parameters mean what they meant there:
- capacity round(cf * S / E) per group of 8192 tokens, at least 4 slots (min_expert_capacity),
  cf 1.25 in training and 2.0 in evaluation;
- the top-1 probability is the combine weight ('raw'; with top-1 GShard's rule agrees);
- load-balancing loss 1e-2 over tokens, as flaxformer computes it ('tokens': uniform routing
  gives k; with top-1 the same as moejax's default), averaged over the MoE layers as T5X does
  (moejax sums them: 1e-2 / 12 layers), no router z-loss, no jitter;
- no batch-prioritized routing: flaxformer turns it off in decoders ("BPR breaks
  autoregressive behavior"), and this is a decoder.
Not reproduced: relu experts (moejax has gelu/swiglu), the encoder-decoder stack, Adafactor's
decay 0.8 schedule. Variants: `:N` gives N experts (flaxformer's switch_base.gin has 64).
COMMAND: python launch/train.py --config=configs/switch_base_t5x.py --workdir=DIR
PLAN:    python launch/train.py --config=configs/switch_base_t5x.py --dry_run --simulated_devices=32
"""
from configs import switch_base_8


def get_config(arg: str | None = None):
    cfg = switch_base_8.get_config(arg)
    cfg.moe.update(top_k=1, capacity_factor=1.25, eval_capacity_factor=2.0, group_size=8192,
                   capacity_rule='t5x', min_capacity=4, gate_norm='raw',
                   aux_loss_norm='tokens', z_loss_weight=0.0,
                   jitter=0.0, batch_prioritized=False)
    moe_layers = cfg.model.num_layers // cfg.model.moe_every
    cfg.moe.aux_loss_weight = 1e-2 / moe_layers  # T5X: the mean over layers of the loss, x 1e-2
    return cfg
