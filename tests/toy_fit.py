"The toy regression data and MLP (with dropout) that the kill -9 tests train, in process and in the killed child."
import torch
from torch import nn


class XY(torch.utils.data.Dataset):
    "Fixed random regression data."
    def __init__(self, n=40):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g); self.y = self.x @ torch.randn(6, 2, generator=g)
    def __len__(self): return len(self.x)
    def __getitem__(self, i): return {'x': self.x[i], 'y': self.y[i]}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 2))
    def forward(self, b):
        mse = ((self.net(b['x']) - b['y']) ** 2).mean()
        return {'loss': mse, 'rmse': mse.detach().sqrt()}
