"""An encoder that returns what Hugging Face models return: a ModelOutput-like ordered dict whose
None fields are left out, with a nested tuple of hidden states (not scriptable, like HF models):
ids:int64[batch,seq] -> last_hidden_state, pooler_output, hidden_states.0, hidden_states.1."""

from collections import OrderedDict

import torch
from torch import nn

VOCAB = 100
SIGNATURE = {
    "inputs": [{"name": "ids", "dtype": "int64", "shape": ["batch", "seq"], "value_range": [0, VOCAB]}],
    "dims": {"batch": [1, 2, 4], "seq": [2, 8, 16]},
}


class ModelOutput(OrderedDict):
    """Like transformers' ModelOutput: a dict of the fields that are not None, in order."""

    def __init__(self, **fields):
        super().__init__((k, v) for k, v in fields.items() if v is not None)


class Encoder(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.layer = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.norm = nn.LayerNorm(d)
        self.pool = nn.Linear(d, d)

    def forward(self, ids: torch.Tensor) -> ModelOutput:
        e = self.embed(ids)
        h = self.norm(e + self.layer(e))
        return ModelOutput(
            last_hidden_state=h, pooler_output=torch.tanh(self.pool(h[:, 0])), hidden_states=(e, h), attentions=None
        )


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Encoder().eval()
