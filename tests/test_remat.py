"""Remat policies change what the backward recomputes, never the numbers: the QAT student's loss
gradient is the same under every policy, and `weights` keeps each layer's fake-quantized weights
so the backward does not quantize them again."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_qat.model.config import get_config
from gemma_qat.model.params import init_params
from gemma_qat.model.transformer import REMAT_POLICIES, Transformer
from gemma_qat.quant.policy import RecipePolicy
from gemma_qat.quant.recipe import resolve_recipe

CFG = get_config("tiny-26b-a4b")  # dense and MoE layers, sliding and global attention


def _loss(remat):
    quant = RecipePolicy(resolve_recipe("q4_0", CFG))
    model = Transformer(CFG, quant=quant, remat=remat)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, CFG.vocab_size)

    def loss(params):
        logits = model.apply({"params": params}, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])
    return loss


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def reference_grads(params):
    return jax.jit(jax.grad(_loss("none")))(params)


@pytest.mark.parametrize("remat", sorted(set(REMAT_POLICIES) - {"none"}))
def test_gradients_do_not_depend_on_remat(params, reference_grads, remat):
    grads = jax.jit(jax.grad(_loss(remat)))(params)
    # fp32 reassociation only: the recompute may fuse (and so sum) in another order than the forward. The
    # rounding scales with the terms summed, not with the result, so a gradient that cancels to ~0 (a
    # skip scale's, 2e-9) is held to the tree's scale, and every other one to its own.
    top = max(float(np.abs(np.asarray(r)).max()) for r in jax.tree.leaves(reference_grads))
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(reference_grads)):
        scale = float(np.abs(np.asarray(r)).max())
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5 * scale + 1e-7 * top,
                                   err_msg=jax.tree_util.keystr(path))


def _quantizations(remat, params) -> int:
    # Each Q4_0 fake-quant calls the jitted core (block max, codes) once; count them in the gradient's program.
    return str(jax.make_jaxpr(jax.grad(_loss(remat)))(params)).count("name=_q4_0_core")


def test_weights_policy_does_not_requantize_in_the_backward(params):
    once = _quantizations("none", params)
    assert once > 0
    assert _quantizations("full", params) == 2 * once  # the backward's recompute quantizes again
    assert _quantizations("weights", params) == once


def _barriers(jaxpr) -> list[tuple]:
    """Operand shapes of every optimization_barrier in a jaxpr and the jaxprs it calls."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "optimization_barrier":
            found.append(tuple(v.aval.shape for v in eqn.invars))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    found += _barriers(sub)
    return found


@pytest.mark.parametrize("variant,remat", [("tiny-e2b", "none"), ("tiny-e2b", "full"), ("tiny-26b-a4b", "full")])
def test_each_weight_gradient_leaves_the_backward_with_its_input_gradient(variant, remat):
    # layers.tie_gradients: every projection's weight cotangent and its input's cotangent pass one barrier
    # together, and attention's dQ with its dK and dV, so the compiler cannot defer the weight (or dK/dV)
    # dots, and the activations they read, to where the gradients are reduced. E2B on 8xH100 kept 41 GiB
    # more live that way (launch/README.md). tiny-e2b: KV-shared layers, PLE, sliding and global layers;
    # tiny-26b-a4b: the router and the experts' grouped matmuls (26B-A4B on v5p-128 kept 36 GiB more live).
    cfg = get_config(variant)
    model = Transformer(cfg, remat=remat)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
    loss = lambda p: jnp.sum(model.apply({"params": p}, tokens).astype(jnp.float32) ** 2)  # noqa: E731
    barriers = _barriers(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    weights = [w.size for path, w in jax.tree_util.tree_leaves_with_path(params)
               if jax.tree_util.keystr(path).endswith("['w']")]
    pairs = sorted(math.prod(b[1]) for b in barriers if len(b) == 2 and len(b[1]) > 1)
    assert pairs == sorted(weights)  # one per projection, its weight second (the experts' [E, 2, F, D] as [E, 2F, D])
    # And every RMSNorm scale with its norm's input (layers.tie_scale_gradient): 31B on 4x8xH100 kept 18 GiB
    # of norm inputs and cotangents live for scale-gradient reductions placed late.
    scales = sorted(w.shape for path, w in jax.tree_util.tree_leaves_with_path(params)
                    if jax.tree_util.keystr(path).endswith("['scale']"))
    tied_scales = sorted(b[1] for b in barriers if len(b) == 2 and len(b[1]) == 1)
    assert scales and tied_scales == scales
    triples = [b for b in barriers if len(b) == 3]  # (q [B,T,K,G,H], k, v [B,S,K,H]) per attention layer
    assert len(triples) == cfg.num_layers and all(len(q) == 5 and k == v for q, k, v in triples)
