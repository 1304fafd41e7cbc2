"""A tiny model sharded over 8 fake CPU devices gives the logits of the unsharded model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_qat import sharding
from gemma_qat.model.config import get_config
from gemma_qat.model.params import abstract_params, init_params, logical_axes
from gemma_qat.model.transformer import Transformer

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

CASES = [
    ("tiny-e2b", sharding.MeshConfig(data=2, fsdp=4, parallelism="fsdp")),
    ("tiny-e4b", sharding.MeshConfig(data=2, fsdp=2, tensor=2, parallelism="fsdp_tp")),
    ("tiny-31b", sharding.MeshConfig(fsdp=4, tensor=2, parallelism="fsdp_tp")),
    ("tiny-26b-a4b", sharding.MeshConfig(fsdp=2, tensor=2, expert=2, parallelism="fsdp_tp_ep")),
]


@pytest.mark.parametrize("name,mesh_config", CASES, ids=[c[0] + "-" + c[1].parallelism for c in CASES])
def test_sharded_logits_equal_unsharded(name, mesh_config):
    cfg = get_config(name)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 20), 0, cfg.vocab_size)
    model = Transformer(cfg)
    ref = model.apply({"params": params}, tokens)

    mesh = sharding.make_mesh(mesh_config)
    shardings = sharding.tree_shardings(abstract_params(cfg), logical_axes(cfg), mesh, mesh_config.parallelism)
    params_s = jax.device_put(params, shardings)
    tokens_s = jax.device_put(tokens, sharding.batch_sharding(mesh, mesh_config.parallelism))
    # Parameters really are spread: the embedding is split along the model dim over fsdp.
    emb = params_s["embedder"]["input_embedding"]
    assert emb.addressable_shards[0].data.shape[1] == cfg.d_model // mesh.shape["fsdp"]
    with sharding.activate(mesh, mesh_config.parallelism):
        out = jax.jit(lambda p, t: model.apply({"params": p}, t))(params_s, tokens_s)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=2e-5)


def test_experts_are_split_over_the_expert_axis():
    cfg = get_config("tiny-26b-a4b")
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, tensor=2, expert=2, parallelism="fsdp_tp_ep"))
    sh = sharding.tree_shardings(abstract_params(cfg), logical_axes(cfg), mesh, "fsdp_tp_ep")
    assert sh["layer_0"]["mlp"]["gating_einsum"]["w"].spec[0] == "expert"


@pytest.mark.parametrize("recipe", ["fsdp", "fsdp_tp", "fsdp_tp_ep"])
def test_ple_table_is_sharded_under_every_recipe(recipe):
    """The E models' per-layer-embedding table is the largest tensor of E2B (2.35 B parameters): it must
    not be replicated on every device. Weights with both `embed` and `ple` keep fsdp on `embed`."""
    cfg = get_config("tiny-e2b")
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=4, tensor=2, parallelism=recipe))
    sh = sharding.tree_shardings(abstract_params(cfg), logical_axes(cfg), mesh, recipe)
    assert sh["embedder"]["per_layer_embeddings"].spec[2] == "fsdp"
    assert sh["embedder"]["per_layer_model_projection"]["w"].spec[0] == "fsdp"


def test_mesh_errors_name_the_problem():
    with pytest.raises(ValueError, match="has 4 devices but 8 are present"):
        sharding.MeshConfig(data=2, fsdp=2).shape(8)
    with pytest.raises(ValueError, match="not a multiple of 3"):
        sharding.MeshConfig(data=3).shape(8)
    with pytest.raises(ValueError, match=r"mesh.parallelism=.zero3. must be one of \[.fsdp., .fsdp_tp., .fsdp_tp_ep.\]"):
        sharding.MeshConfig(parallelism="zero3")


def test_moe_routes_each_devices_rows_locally():
    """Under a mesh the experts run in a shard_map over the batch (model/moe.py): output and gradients
    equal the unsharded layer's, and no collective of the compiled step carries routed token rows
    (before, the partitioner sorted all of the step's B·T·k rows on every device: 26B-A4B on v5p-128
    all-reduced 4.2 TB per step per chip). What moves is weights and the tensor-parallel partial sums;
    the expert weights are gathered inside, so their gradients leave by reduce-scatter into the
    parameter shards, not as an all-reduce of the gathered weight over the batch devices."""
    from gemma_qat.model.moe import MoE
    from gemma_qat.model.layers import NoQuant
    from gemma_qat.preflight import collectives

    cfg = get_config("tiny-26b-a4b")
    layer = MoE(d_model=cfg.d_model, num_experts=cfg.num_experts, top_k=cfg.top_k_experts,
                hidden=cfg.expert_ffn_dim, quant=NoQuant(), grouped="ragged")
    b, t = 8, 32
    x = jax.random.normal(jax.random.PRNGKey(0), (b, t, cfg.d_model))
    params = layer.init(jax.random.PRNGKey(1), x, x)["params"]
    loss = lambda p, x: jnp.sum(jnp.sin(layer.apply({"params": p}, x, x)))  # noqa: E731
    ref = jax.value_and_grad(loss, argnums=(0, 1))(params, x)

    mc = sharding.MeshConfig(fsdp=2, tensor=2, expert=2, parallelism="fsdp_tp_ep")
    mesh = sharding.make_mesh(mc)
    with sharding.activate(mesh, mc.parallelism):
        specs = jax.tree.map(lambda a: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), params)
        specs["gating_einsum"]["w"] = jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec("expert", None, "tensor", "fsdp"))
        specs["linear"]["w"] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert", "tensor", "fsdp"))
        x_s = jax.device_put(x, sharding.batch_sharding(mesh, mc.parallelism).update(
            spec=jax.sharding.PartitionSpec(("data", "fsdp", "expert"))))
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), out_shardings=(None, (specs, None)))
        got = step(jax.device_put(params, specs), x_s)
        text = step.lower(jax.device_put(params, specs), x_s).compile().as_text()
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-5)
    found = collectives.from_text(text)
    routed_rows_per_device = b // 4 * t * cfg.top_k_experts  # fsdp × expert split the rows 4 ways
    for c in found:
        for shape in c.shapes + c.result_shapes:
            assert routed_rows_per_device not in shape and b * t * cfg.top_k_experts not in shape, (c.name, shape)
    e, f, d = cfg.num_experts, cfg.expert_ffn_dim, cfg.d_model
    gathered = {(e, 2, f // 2, d), (e, f // 2, d), (e, 2 * f // 2, d), (e, d, 2 * f // 2), (e, d, f // 2)}
    for c in found:  # an all-reduce over a group of one (data = 1) moves nothing
        if c.kind == "all-reduce" and c.group_size > 1:
            assert not gathered & set(c.shapes), (c.name, c.shapes)
    scattered = {r for c in found if c.kind == "reduce-scatter" for r in c.result_shapes}
    assert {(e // 2, 2, f // 2, d // 2), (e // 2, f // 2, d // 2)} <= scattered, scattered


def test_moe_experts_under_a_mesh_may_take_the_per_device_kernels(monkeypatch):
    """Inside the MoE's shard_map each device multiplies its own rows, so the grouped matmul is told it
    runs per device (`auto` may then pick the Hopper kernels under any mesh: grouped_matmul.auto_impl);
    without a mesh it keeps the one-device rule."""
    from gemma_qat.model import moe
    from gemma_qat.model.layers import NoQuant

    seen = []
    real = moe.grouped_matmul
    monkeypatch.setattr(moe, "grouped_matmul", lambda *a, **kw: seen.append(kw["per_device"]) or real(*a, **kw))
    cfg = get_config("tiny-26b-a4b")
    layer = moe.MoE(d_model=cfg.d_model, num_experts=cfg.num_experts, top_k=cfg.top_k_experts,
                    hidden=cfg.expert_ffn_dim, quant=NoQuant())
    x = jnp.zeros((8, 16, cfg.d_model))
    params = jax.eval_shape(layer.init, jax.random.PRNGKey(1), x, x)
    seen.clear()
    jax.eval_shape(layer.apply, params, x, x)
    assert seen == [False, False]  # the gate/up and the down projection
    mc = sharding.MeshConfig(fsdp=2, tensor=2, expert=2, parallelism="fsdp_tp_ep")
    with sharding.activate(sharding.make_mesh(mc), mc.parallelism):
        jax.eval_shape(layer.apply, params, x, x)
    assert seen == [False, False, True, True]


@pytest.mark.parametrize("ple", [False, True], ids=["embedding", "ple"])
def test_embedding_lookup_moves_rows_not_the_table(ple):
    """Under data 2 × fsdp 2 × tensor 2 the token embedding (and the PLE table, sharded along P) is looked up
    in each device's own shard (model/embed.py lookup): values and gradients equal the unsharded lookup,
    and no collective of the compiled step carries the whole vocabulary (left to the partitioner, the table
    was all-gathered over its vocabulary shards and its gradient all-reduced over all of them)."""
    from flax import linen as nn
    from gemma_qat.model.embed import Embedder
    from gemma_qat.model.layers import NoQuant
    from gemma_qat.preflight import collectives

    v, d, layers, p, b, t = 512, 64, 3, 16, 16, 32
    emb = Embedder(vocab_size=v, d_model=d, num_layers=layers, ple_dim=p if ple else 0, quant=NoQuant())
    tokens = jax.random.randint(jax.random.PRNGKey(0), (b, t), -2, v)  # a few negative: from the end
    fn = (lambda e, tok: e.per_layer_inputs(tok, jnp.zeros((b, t, d)))) if ple else Embedder.encode
    params = nn.unbox(emb.init(jax.random.PRNGKey(1), tokens, method=fn)["params"])
    loss = lambda prm, tok: jnp.sum(jnp.sin(emb.apply({"params": prm}, tok, method=fn)))  # noqa: E731
    ref = jax.value_and_grad(loss)(params, tokens)
    mc = sharding.MeshConfig(data=2, fsdp=2, tensor=2, parallelism="fsdp_tp")
    mesh = sharding.make_mesh(mc)
    with sharding.activate(mesh, mc.parallelism):
        boxed = jax.eval_shape(lambda: emb.init(jax.random.PRNGKey(1), tokens, method=fn))["params"]
        shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), nn.logical_to_mesh(
            nn.get_partition_spec(boxed)), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        args = jax.device_put(params, shardings), jax.device_put(tokens, sharding.batch_sharding(mesh, mc.parallelism))
        step = jax.jit(jax.value_and_grad(loss), out_shardings=(None, shardings))
        got = step(*args)
        text = step.lower(*args).compile().as_text()
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
    found = collectives.from_text(text)
    assert any(c.kind == "all-to-all" for c in found)
    for c in found:
        for shape in c.shapes + c.result_shapes:
            assert v not in shape, (c.kind, shape)  # at most the vocabulary shard (v / 2 rows) moves


def test_loss_gathers_the_head_tables_once_and_reduces_their_gradient_once():
    """The fused distillation loss under fsdp 4 × tensor 2: equal to the unsharded loss and gradients, and
    the head tables are gathered before the chunk loop (loss/fused.py _GATHERED_TABLE_AXES), once. The GPU
    compiler had gathered them 3 times per chunk (31B on 4x8xH100: 25 GB per step, between hosts)."""
    from gemma_qat.loss import distill
    from gemma_qat.preflight import collectives

    b, t, d, v = 8, 64, 32, 256
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    sh, th = (jax.random.normal(k, (b, t, d), jnp.bfloat16) for k in ks[:2])  # fp32 tables, cast inside
    se, te = (0.3 * jax.random.normal(k, (v, d)) for k in ks[2:])
    loss = lambda sh, se: distill.chunked_distill_loss(sh, th, se, te, softcap=30.0, chunk_size=16)[0]  # noqa: E731
    ref = jax.value_and_grad(loss, argnums=(0, 1))(sh, se)

    mc = sharding.MeshConfig(fsdp=4, tensor=2, parallelism="fsdp_tp")
    mesh = sharding.make_mesh(mc)
    named = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))  # noqa: E731
    with sharding.activate(mesh, mc.parallelism):
        args = (jax.device_put(sh, named("fsdp")), jax.device_put(se, named("tensor", "fsdp")))
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        got = step(*args)
        found = collectives.from_text(step.lower(*args).compile().as_text())
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=2e-2, atol=2e-3)
    # One gather of the student table (the teacher's is not sharded here), outside the loop. XLA:CPU hoists
    # gathers out of loops itself, but gathered the table twice, for the logits and for dL/dh; the GPU
    # compiler gathered it inside the loop.
    gathers = [c for c in found if c.kind == "all-gather"]
    assert len(gathers) == 1 and not gathers[0].in_loop, [(c.name, c.shapes, c.in_loop) for c in gathers]
    # The table gradient is reduced over fsdp once, after the loop: each device adds its rows' chunks into
    # its own partial table (loss/fused.py _PARTIAL_TABLE_AXES). Reduced per chunk, it was 16.9 GB of fp32
    # reduce-scatter per step per GPU for 31B on 4x8xH100.
    table_grads = [c for c in found if c.kind != "all-gather" and {(v // 2, d), (v // 2, d // 4)} & set(c.shapes)]
    assert len(table_grads) == 1 and not table_grads[0].in_loop, [(c.name, c.shapes, c.in_loop) for c in table_grads]
