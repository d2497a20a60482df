"""Style/content decomposition of feature maps (AdaIN, as MODE-A uses it) and the candidate selection rule.

A feature map z (B, C, H, W) splits into style = per-channel (mean, std) and content = the instance-normalised map;
AdaIN puts them back together: z = std · content + mean. DomainFusion's online augmentation keeps, among N
candidates, the style *farthest* from the source image's and the content *closest* to it, then recombines them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-5


def style(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation, each (B, C)."""
    flat = z.flatten(2)
    return flat.mean(dim=2), flat.var(dim=2, unbiased=False).add(EPS).sqrt()


def content(z: torch.Tensor) -> torch.Tensor:
    """The instance-normalised map (zero mean, unit std per channel), same shape as z."""
    mean, std = style(z)
    return (z - mean[..., None, None]) / std[..., None, None]


def adain(content_map: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Give a content map the style (mean, std): std · content + mean."""
    return content_map * std[..., None, None] + mean[..., None, None]


def style_distance(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """L2 distance between concatenated (mean, std) vectors; broadcasts over leading dimensions."""
    return (torch.cat(a, dim=-1) - torch.cat(b, dim=-1)).norm(dim=-1)


def content_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of flattened content maps; broadcasts over leading dimensions."""
    return F.cosine_similarity(a.flatten(-3), b.flatten(-3), dim=-1)


def candidate_scores(source: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For source maps (B, C, H, W) and candidates (B, N, C, H, W): each candidate's style distance to its source
    and content similarity with it, both (B, N)."""
    b, n = candidates.shape[:2]
    cand_style = tuple(s.view(b, n, -1) for s in style(candidates.flatten(0, 1)))
    src_style = tuple(s[:, None] for s in style(source))
    cand_content = content(candidates.flatten(0, 1)).view_as(candidates)
    return style_distance(cand_style, src_style), content_similarity(cand_content, content(source)[:, None])


def select_style_content(source: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B,) of the candidate whose style is most different from the source's and of the candidate whose
    content is most similar to the source's."""
    distance, similarity = candidate_scores(source, candidates)
    return distance.argmax(dim=1), similarity.argmax(dim=1)


def selection_stats(
    source: torch.Tensor, candidates: torch.Tensor, style_pick: torch.Tensor, content_pick: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per image (B,): the picked style's distance from the source and the average candidate's (what a random pick
    gets in expectation), and likewise the picked content's similarity — what the selection rule buys."""
    distance, similarity = candidate_scores(source, candidates)
    rows = torch.arange(len(candidates), device=candidates.device)
    return {
        "style_distance_picked": distance[rows, style_pick],
        "style_distance_mean": distance.mean(dim=1),
        "content_similarity_picked": similarity[rows, content_pick],
        "content_similarity_mean": similarity.mean(dim=1),
    }


def recombine(candidates: torch.Tensor, style_pick: torch.Tensor, content_pick: torch.Tensor) -> torch.Tensor:
    """AdaIN(style of candidates[i, style_pick[i]], content of candidates[i, content_pick[i]]) for each i."""
    rows = torch.arange(len(candidates), device=candidates.device)
    mean, std = style(candidates[rows, style_pick])
    return adain(content(candidates[rows, content_pick]), mean, std)
