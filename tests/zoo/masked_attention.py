"""Causal self-attention over token ids whose mask is built the way Hugging Face's masking
utilities build it (create_causal_mask, as GPT-2 calls it in transformers 4.57): a mask function
over (batch, query, key) indices, vmapped, that reads the padding mask as `keep[b, k]` inside
torch's TransformGetItemToIndex mode. There, indexing a tensor with index tensors is an autograd Function,
which torch.export records as a `flat_apply` node holding a function constant; torch.export.save
cannot serialize that node ("Failed serializing node flat_apply", `function_const_func_spec0`).

ids:int64[batch,seq] (0 is padding) -> hidden:float32[batch,seq,32]."""

import torch
from torch import nn
from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

VOCAB = 50
SIGNATURE = {
    "inputs": [{"name": "ids", "dtype": "int64", "shape": ["batch", "seq"], "value_range": [0, VOCAB]}],
    "outputs": ["hidden"],
    "dims": {"batch": [1, 2, 3], "seq": [4, 8, 16]},
}


class MaskedAttention(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = ids != 0
        batch = torch.arange(ids.shape[0])
        pos = torch.arange(ids.shape[1])

        def mask_function(b: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            # causal, and no padding key except the query's own position (no row is empty)
            return (k == q) | ((k <= q) & keep[b, k])

        with TransformGetItemToIndex():
            over_k = torch.vmap(mask_function, in_dims=(None, None, 0))
            over_qk = torch.vmap(over_k, in_dims=(None, 0, None))
            mask = torch.vmap(over_qk, in_dims=(0, None, None))(batch, pos, pos)
        h = self.embed(ids)
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, dim=-1)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))
        return self.out(attended.squeeze(1)) + h


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return MaskedAttention().eval()
