"""The UNet's side of DeepCache-style feature reuse (Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for
Free"): one UNet call's role, passed to ``UNet2DConditionModel.forward(deep_cache=...)``.

Branches are the UNet's skip connections, numbered from the shallowest: branch 0 carries ``conv_in``'s output to the
last up layer, branch ``k`` the ``k``-th down layer's output (each resnet (+ transformer) of a down block is a layer,
its downsampler the next one). For the SD / SDXL UNets (two layers and a downsampler per block) this is exactly the
``cache_branch_id`` of DeepCache's ``DeepCacheSDHelper`` (block ``id // 3``, layer ``id % 3``); SD 1.x / 2.x have
branches 0-11, SDXL 0-8.

- A *full* step (``cached is None``) runs the whole UNet and keeps, in ``feature``, the hidden states entering the
  up layer that consumes branch ``k``'s skip tensor (everything deeper than branch ``k`` has shaped it).
- A *cached* step (``cached`` given) runs ``conv_in`` and the down layers up to branch ``k`` only, skips the deeper
  down layers, the mid block and the deeper up layers, and continues the up path from ``cached``.

Which steps are full, and how a cached feature is matched to the step's batch, is the pipeline's business
(:mod:`diffusekit.pipelines.deep_cache`).
"""

from __future__ import annotations

import torch

__all__ = ["DeepCacheStep"]


class DeepCacheStep:
    """One UNet call's part in feature caching: ``branch`` (see the module docstring), the ``cached`` feature to
    continue from (``None``: a full step), and, after a full step, the ``feature`` it produced."""

    __slots__ = ("branch", "cached", "feature")

    def __init__(self, branch: int, cached: torch.Tensor | None = None):
        self.branch = branch
        self.cached = cached  # (B, C, h, w) hidden states entering the branch's up layer, from an earlier step
        self.feature: torch.Tensor | None = None  # set by a full step

    @property
    def reuse(self) -> bool:
        return self.cached is not None

    # what optimize()'s AOTInductor packages need to serve a call with a step (aot_packages.PackageInput): the branch
    # goes into the package key, the cached feature in, the kept feature out
    def package_split(self) -> tuple[int, tuple[torch.Tensor | None]]:
        return self.branch, (self.cached,)

    @classmethod
    def package_join(cls, branch: int, tensors: tuple[torch.Tensor | None]) -> "DeepCacheStep":
        return cls(branch, tensors[0])

    def package_results(self) -> tuple[torch.Tensor, ...]:
        return () if self.feature is None else (self.feature,)

    def package_take(self, results: tuple[torch.Tensor, ...]) -> None:
        self.feature = results[0] if results else None

    def __repr__(self) -> str:
        return f"DeepCacheStep(branch={self.branch}, {'cached' if self.reuse else 'full'})"
