"""The train state and its shardings: what a run holds, initialised straight onto the mesh.

The model is traced abstractly (nothing allocated) and every sharding derives from the logical
axis names its parameters carry (moejax.sharding); the optimizer's moments follow their params.
"""
import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import optim, sharding
from moejax.model import transformer


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: steps taken = batches consumed
    params: nnx.State        # trainable parameters (nnx.Param)
    extra: nnx.State         # other model state (the bias of loss-free balancing)
    opt_state: optax.OptState
    rng: jax.Array           # raw key data; step keys are fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What is fixed for a run: the model's structure, the optimizer, and shardings."""
    cfg: object
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    abstract_state: TrainState      # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState
    batch_sharding: NamedSharding


def new_state(cfg, tx, seed) -> tuple[nnx.GraphDef, TrainState]:
    """A freshly initialised model and optimizer, as (graphdef, state)."""
    key = jax.random.key(seed)
    model = transformer.Transformer(cfg, rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
    graphdef, params, extra = nnx.split(model, nnx.Param, ...)
    rng = jax.random.key_data(jax.random.fold_in(key, 1))
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, extra, tx.init(params), rng)


def make_setup(cfg, mesh) -> Setup:
    """Trace the model abstractly (nothing allocated) and derive every sharding from it."""
    tx = optim.make_optimizer(cfg.opt, cfg.train.num_steps)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0))))
    abstract = jax.eval_shape(lambda: new_state(cfg, tx, 0)[1])
    shardings = state_shardings(mesh, tx, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(('batch', 'length')))
    return Setup(cfg, mesh, graphdef, tx, abstract, shardings, batch_sharding)


def state_shardings(mesh, tx, abstract: TrainState) -> TrainState:
    """Params by their logical names; optimizer moments like their params; the rest replicated."""
    is_spec = lambda x: isinstance(x, P)
    param_specs = jax.tree.map(lambda spec, leaf: sharding.fit_spec(spec, leaf.shape, mesh.shape),
                               sharding.tree_specs(nnx.get_partition_spec(abstract.params)),
                               abstract.params, is_leaf=is_spec)
    # Factored (Adafactor) statistics have fewer dims than their param: replicate those.
    fit = lambda leaf, spec: spec if len(spec) == len(leaf.shape) else P()
    opt_specs = optax.tree_map_params(tx, fit, abstract.opt_state, param_specs,
                                      transform_non_params=lambda _: P(), is_leaf=is_spec)
    specs = TrainState(P(), param_specs, jax.tree.map(lambda _: P(), abstract.extra),
                       opt_specs, P())
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)


def init_state(setup: Setup, seed: int) -> TrainState:
    """Initialise parameters directly into their shardings (no full copy on any device)."""
    init = lambda seed: new_state(setup.cfg, setup.tx, seed)[1]
    with jax.set_mesh(setup.mesh):
        return jax.jit(init, out_shardings=setup.state_shardings)(seed)


def same_optimizer_state(cfg, saved_cfg) -> bool:
    """Whether the saved config's optimizer state has this config's structure and shapes."""
    tx = optim.make_optimizer(cfg.opt, cfg.train.num_steps)
    abstract = jax.eval_shape(lambda: new_state(cfg, tx, 0)[1])
    saved_tx = optim.make_optimizer(saved_cfg.opt, saved_cfg.train.num_steps)
    saved = jax.eval_shape(saved_tx.init, abstract.params)
    describe = lambda tree: (jax.tree.structure(tree),
                             [(x.shape, x.dtype) for x in jax.tree.leaves(tree)])
    return describe(saved) == describe(abstract.opt_state)


def global_batch(setup: Setup, host_batch: dict) -> dict:
    """Assemble the global batch from each process's rows (no data crosses hosts)."""
    return {k: jax.make_array_from_process_local_data(setup.batch_sharding, np.asarray(v))
            for k, v in host_batch.items()}
