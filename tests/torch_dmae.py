"""A from-scratch PyTorch reference of the official DMAE models (timm 0.5.4 key names).

`TorchDMAE` computes what `models_dmae.DenoisingMaskedAutoencoderViT` computes and
`TorchViTClassifier` what the fine-tuning `models_vit.VisionTransformer` computes, with the
same state_dict keys, so the importer and the benchmarks can compare against them without
timm. Differences from the official code, all for testing: the noise and the patch order
can be passed in explicitly, sigma is an argument, inputs of another size are resized to
`img_size` (the official code hard-codes 224) with the same bicubic `F.interpolate`.
Inputs are NCHW float tensors in [0, 1]. Plain module: no pytest needed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def sincos_2d(grid_size: int, dim: int) -> np.ndarray:
    """[1 + g*g, dim] MAE sin-cos embedding: first half of channels = column, zero cls row."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                                 np.arange(grid_size, dtype=np.float64))
    emb = np.concatenate([one_d(dim // 2, grid_w), one_d(dim // 2, grid_h)], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb], axis=0)


class Attention(nn.Module):
    """timm 0.5.4 Attention with qkv bias."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """timm 0.5.4 Mlp: fc1, exact GELU, fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """timm 0.5.4 per-sample stochastic depth."""
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


class Block(nn.Module):
    """timm 0.5.4 pre-norm Block, LayerNorm eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchEmbed(nn.Module):
    """timm 0.5.4 PatchEmbed: conv p x p stride p, flatten(2).transpose(1, 2)."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _prepare(x: torch.Tensor, img_size: int, mean, std) -> torch.Tensor:
    if x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bicubic", align_corners=False)
    mean = torch.tensor(mean, dtype=x.dtype).reshape(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype).reshape(1, 3, 1, 1)
    return (x - mean) / std


class TorchDMAE(nn.Module):
    """Official DMAE pretraining model (`DenoisingMaskedAutoencoderViT`)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0,
                 norm_pix_loss: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.norm_pix_loss = norm_pix_loss
        self.mean, self.std = mean, std
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            torch.from_numpy(sincos_2d(grid, embed_dim)).float()[None], requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.from_numpy(sincos_2d(grid, decoder_embed_dim)).float()[None],
            requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), (p, q, c) order."""
        p, c = self.patch_size, self.in_chans
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p * p * c)

    def random_masking(self, x: torch.Tensor, mask_ratio: float,
                       ids_shuffle: torch.Tensor | None = None):
        """Keep int(L * (1 - mask_ratio)) tokens in argsort-of-uniform order."""
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if ids_shuffle is None:
            ids_shuffle = torch.argsort(torch.rand(n, length), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones([n, length])
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, x: torch.Tensor, mask_ratio: float,
                        ids_shuffle: torch.Tensor | None = None):
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, ids_shuffle)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(
            x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return ((pred - target) ** 2).mean()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, sigma: float = 0.25,
                noise: torch.Tensor | None = None, ids_shuffle: torch.Tensor | None = None):
        """Returns (loss, pred [N, L, p*p*C], mask [N, L])."""
        noise = torch.randn_like(imgs) if noise is None else noise
        imgs_noised = imgs + sigma * noise
        imgs = _prepare(imgs, self.img_size, self.mean, self.std)
        imgs_noised = _prepare(imgs_noised, self.img_size, self.mean, self.std)
        latent, mask, ids_restore = self.forward_encoder(imgs_noised, mask_ratio, ids_shuffle)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred), pred, mask


class TorchViTClassifier(nn.Module):
    """Official fine-tuning classifier (MAE `models_vit.VisionTransformer` over timm 0.5.4)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 global_pool: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.img_size = img_size
        self.global_pool = global_pool
        self.mean, self.std = mean, std
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        rates = np.linspace(0.0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(
            *[Block(embed_dim, num_heads, mlp_ratio, rates[i]) for i in range(depth)])
        if global_pool:
            self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = _prepare(x, self.img_size, self.mean, self.std)
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        x = self.blocks(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def randomize_(module: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Fills every parameter except fixed pos embeds with N(0, std) (LayerNorm scales around 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if ("norm" in name and name.endswith("weight")) else noise)
    return module


def count_parameters(module: nn.Module) -> int:
    """All parameters, including the frozen sin-cos pos embeds (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
