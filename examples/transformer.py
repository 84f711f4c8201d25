"""A pre-LayerNorm transformer encoder block: attention (q/k/v/out projections), GELU MLP, residuals.

    python examples/transformer.py
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def split(self, t):  # [B, T, D] -> [B, H, T, D/H]
        return t.view(t.size(0), t.size(1), self.heads, -1).transpose(1, 2)

    def forward(self, x):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(x.size(0), x.size(1), -1))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int = 256, heads: int = 4, mlp: int = 1024):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Encoder(nn.Module):
    def __init__(self, depth: int = 2, dim: int = 256, heads: int = 4, mlp: int = 1024):
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def build_model():
    torch.manual_seed(0)
    return Encoder().eval(), (torch.randn(2, 16, 256),)


if __name__ == "__main__":
    import sparsec

    model, inputs = build_model()
    cm = sparsec.compile(model, pattern="2:4", example_inputs=inputs)
    print(cm.plan)
