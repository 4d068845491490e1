"""The image forms every reward accepts, and conversions between them.

    uint8 numpy array [B, H, W, 3]           what the pipeline returns with output_type="np" (x255)
    float tensor [B, 3, H, W] in [0, 1]      what the serving batcher hands the scorer
    list of PIL images                       what a user or a test has

Rewards that read pixels (oracle, color_diversity) want uint8 arrays; rewards through CLIP (clip, learned)
take the tensor or PIL forms the RewardScorer preprocesses. Nothing is silently fixed: a wrong shape,
dtype or range is an error naming the argument and the value.
"""

from typing import Sequence, Union

import numpy as np
import torch

Images = Union[np.ndarray, torch.Tensor, Sequence]  # one of the three forms above


def check_images(images: Images, name: str = "images") -> int:
    """The batch size B of `images`, after checking that they are one of the accepted forms."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{name} as a numpy array must be uint8 [B, H, W, 3], got shape {images.shape}")
        if images.dtype != np.uint8:
            raise TypeError(f"{name} as a numpy array must be uint8 [B, H, W, 3], got dtype {images.dtype}")
        return images.shape[0]
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{name} as a tensor must be [B, 3, H, W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"{name} as a tensor must be float with values in [0, 1], got {images.dtype}")
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise ValueError(f"{name} as a tensor must have values in [0, 1], got min {images.min().item():.4g} "
                             f"and max {images.max().item():.4g}")
        return images.shape[0]
    if isinstance(images, (str, bytes)) or not hasattr(images, "__len__"):
        raise TypeError(f"{name} must be a uint8 array [B,H,W,3], a float tensor [B,3,H,W] or a list of PIL "
                        f"images, got {type(images).__name__}")
    for i, image in enumerate(images):
        if not hasattr(image, "convert"):
            raise TypeError(f"{name}[{i}] must be a PIL image (or pass one array or tensor), got {type(image).__name__}")
    return len(images)


def to_uint8(images: Images) -> np.ndarray:
    """Images as a uint8 numpy array [B, H, W, 3] (a float tensor is rounded from [0, 1] to 0..255)."""
    check_images(images)
    if isinstance(images, np.ndarray):
        return images
    if isinstance(images, torch.Tensor):
        return (images.detach().to("cpu", torch.float32) * 255).round().clamp(0, 255).to(torch.uint8) \
            .permute(0, 2, 3, 1).numpy()
    if len(images) == 0:
        return np.zeros((0, 0, 0, 3), np.uint8)
    arrays = [np.asarray(image.convert("RGB")) for image in images]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"images must all have the same size to make one array, got {sorted({a.shape for a in arrays})}")
    return np.stack(arrays)


def to_clip_input(images: Images):
    """What RewardScorer takes: the float tensor or the PIL list as they are, a uint8 array as a float
    tensor [B, 3, H, W] in [0, 1] (the same pixels ToTensor makes of the PIL image)."""
    check_images(images)
    if isinstance(images, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    return images


def select(images: Images, indices: Sequence[int]) -> Images:
    """The images at `indices`, in the same form."""
    indices = list(indices)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return images[indices]
    return [images[i] for i in indices]
