"""A small BERT-like encoder (post-LayerNorm blocks, the layout ONNX Runtime's transformer fusions
recognise) over token ids with a dynamic sequence length:
ids:int64[batch,seq] -> logits[batch,num_classes]. `build_small_bert_embeddings` embeds as Hugging
Face's BertEmbeddings does when called with input ids alone: word, token type and position
embeddings summed, the position ids a slice of a buffer and the token types zeros from another."""

import math

import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 1000
SIGNATURE = {
    "inputs": [{"name": "ids", "dtype": "int64", "shape": ["batch", "seq"], "value_range": [0, VOCAB]}],
    "outputs": ["logits"],
    "dims": {"batch": [1, 4, 8], "seq": [4, 64, 128]},
}
SMALL_SIGNATURE = {
    "inputs": [{"name": "ids", "dtype": "int64", "shape": ["batch", "seq"], "value_range": [0, VOCAB]}],
    "outputs": ["logits"],
    "dims": {"batch": [1, 2, 4], "seq": [2, 8, 16]},
}


class Attention(nn.Module):
    """BERT's self-attention: separate query, key and value projections, heads split by a reshape."""

    def __init__(self, d: int, heads: int, sdpa: bool = False) -> None:
        super().__init__()
        self.heads, self.dh, self.sdpa = heads, d // heads, sdpa
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.reshape(b, s, self.heads, self.dh).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if self.sdpa:  # what Hugging Face models call by default
            heads = F.scaled_dot_product_attention(q, k, v)
        else:
            heads = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dh), dim=-1) @ v
        return self.out(heads.transpose(1, 2).reshape(b, s, d))


class Layer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, sdpa: bool = False) -> None:
        super().__init__()
        self.att, self.ln1 = Attention(d, heads, sdpa), nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
        self.ln2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.att(x))
        return self.ln2(x + self.ff(x))


class Encoder(nn.Module):
    def __init__(
        self,
        d: int = 256,
        heads: int = 4,
        ff: int = 1024,
        layers: int = 4,
        classes: int = 16,
        max_len: int = 512,
        sdpa: bool = False,
        token_types: int = 0,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(max_len, d)
        self.types = nn.Embedding(token_types, d) if token_types else None
        if token_types:  # BertEmbeddings' buffers (not saved with the weights)
            self.register_buffer("position_ids", torch.arange(max_len)[None], persistent=False)
            self.register_buffer("token_type_ids", torch.zeros(1, max_len, dtype=torch.long), persistent=False)
        self.ln = nn.LayerNorm(d)
        self.layers = nn.ModuleList(Layer(d, heads, ff, sdpa) for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.types is None:
            pos = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
            x = self.ln(self.tok(ids) + self.pos(pos))
        else:
            b, s = ids.shape
            pos = self.position_ids[:, :s]
            x = self.tok(ids) + self.types(self.token_type_ids[:, :s].expand(b, s))
            x = self.ln(x + self.pos(pos))
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(dim=1))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Encoder().eval()


def build_small() -> nn.Module:
    torch.manual_seed(0)
    return Encoder(d=32, heads=2, ff=64, layers=1, classes=4, max_len=32).eval()


def build_small_sdpa() -> nn.Module:
    """The small encoder with its attention in torch's fused scaled_dot_product_attention."""
    torch.manual_seed(0)
    return Encoder(d=32, heads=2, ff=64, layers=1, classes=4, max_len=32, sdpa=True).eval()


def build_small_bert_embeddings() -> nn.Module:
    """The small encoder embedding token ids as BERT does (word, token type and position)."""
    torch.manual_seed(0)
    return Encoder(d=32, heads=2, ff=64, layers=1, classes=4, max_len=32, token_types=2).eval()
