"""ZCA whitening of whole splits, fitted and applied a chunk of rows at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch

ZCA_EPS = 0.1
ZCA_CHUNK_ROWS = 4096


class ZCAWhitening:
    """ZCA on flattened [0,1] pixels, as the reference's kornia ZCAWhitening(eps=0.1).

    Kept here rather than importing kornia so fitting can stream the training set in
    chunks (Tiny-ImageNet as float would not fit in memory twice) and so the inverse
    used for saving PNGs is exact.
    """

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor, inverse_matrix: torch.Tensor) -> None:
        self.mean = mean
        self.matrix = matrix
        self.inverse_matrix = inverse_matrix

    @classmethod
    def fit(cls, images: torch.Tensor, eps: float = ZCA_EPS) -> ZCAWhitening:
        """Mean and unbiased covariance in float64, then U diag(1/sqrt(S+eps)) U^T."""
        count = len(images)
        if count < 2:
            raise ValueError("ZCA needs at least two images")
        mean = sum(chunk.sum(dim=0) for chunk in _pixel_chunks(images)) / count
        covariance = torch.zeros(len(mean), len(mean), dtype=torch.float64)
        for chunk in _pixel_chunks(images):
            centered = chunk - mean
            covariance.addmm_(centered.T, centered)
        covariance /= count - 1
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.clamp_min(0) + eps
        matrix = (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T
        inverse_matrix = (eigenvectors * eigenvalues.sqrt()) @ eigenvectors.T
        return cls(mean.float(), matrix.float(), inverse_matrix.float())

    def to(self, device: torch.device | str) -> ZCAWhitening:
        return ZCAWhitening(self.mean.to(device), self.matrix.to(device), self.inverse_matrix.to(device))

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """Whiten [N,...] images (uint8 pixels or floats in [0,1]) into float32 of the same shape."""
        out = torch.empty(len(images), self.matrix.shape[0], dtype=torch.float32, device=self.matrix.device)
        start = 0
        for chunk in _pixel_chunks(images):
            out[start : start + len(chunk)] = (chunk.to(self.matrix) - self.mean) @ self.matrix
            start += len(chunk)
        return out.reshape(images.shape)

    def inverse(self, whitened: torch.Tensor) -> torch.Tensor:
        """Map whitened images back to [0,1]-scale pixels (float32, same shape)."""
        flat = whitened.reshape(len(whitened), -1).to(self.inverse_matrix)
        return (flat @ self.inverse_matrix + self.mean).reshape(whitened.shape)


def _pixel_chunks(images: torch.Tensor) -> Iterator[torch.Tensor]:
    """Flattened float64 [0,1] rows a chunk at a time, so no full float copy is made."""
    flat = images.reshape(len(images), -1)
    for start in range(0, len(flat), ZCA_CHUNK_ROWS):
        chunk = flat[start : start + ZCA_CHUNK_ROWS].to(torch.float64)
        yield chunk / 255 if images.dtype == torch.uint8 else chunk
