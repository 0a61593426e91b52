"""Shared by the PyTorch benchmark scripts: the official model with random weights."""

import torch


def build(config, size, seed):
    """`build_sam2` (real-use settings, as users get it) with random weights at size `size`.

    Zero-initialised parameters (pos embeds, biases) get small random values so no
    computation is trivially skipped or degenerate.
    """
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    name = config if config.endswith(".yaml") else f"configs/{config.split('_hiera')[0]}/{config}.yaml"
    model = build_sam2(name, ckpt_path=None, device="cpu", mode="eval",
                       hydra_overrides_extra=[f"++model.image_size={size}"])
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.add_(0.02 * torch.randn_like(p))
    return model.eval()
