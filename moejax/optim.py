"""The Optax chain from cfg.opt: warmup + schedule, clipping, decoupled weight decay."""
import jax
import optax

OPTIMIZERS = ('adamw', 'adafactor')
SCHEDULES = ('cosine', 'rsqrt', 'constant')


def schedule(opt_cfg, num_steps: int) -> optax.Schedule:
    """Linear warmup to opt.lr, then cosine decay to 10%, inverse square root, or constant."""
    lr, warmup = opt_cfg.lr, opt_cfg.warmup_steps
    warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
    if opt_cfg.schedule == 'cosine':
        after = optax.cosine_decay_schedule(lr, max(num_steps - warmup, 1), alpha=0.1)
    elif opt_cfg.schedule == 'rsqrt':
        after = lambda step: lr * jax.lax.rsqrt((step + max(warmup, 1)) / max(warmup, 1))
    else:
        after = optax.constant_schedule(lr)
    return optax.join_schedules([warm, after], [warmup])


def decay_mask(params):
    """Decay matrices only: no weight decay on norms, the embedding table or 1-D vectors."""
    def decays(path, leaf):
        names = [str(getattr(p, 'key', p)) for p in path]
        return leaf.ndim >= 2 and 'embed' not in names and not any('norm' in n for n in names)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt_cfg, num_steps: int) -> optax.GradientTransformation:
    lr = schedule(opt_cfg, num_steps)
    if opt_cfg.name == 'adamw':
        opt = optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=1e-8,
                          weight_decay=opt_cfg.weight_decay, mask=decay_mask)
    else:
        opt = optax.adafactor(lr, weight_decay_rate=opt_cfg.weight_decay or None,
                              weight_decay_mask=decay_mask)
    if opt_cfg.clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(opt_cfg.clip_norm), opt)
    return opt
