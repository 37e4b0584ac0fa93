"""DP-SGD for your own model and training loop ("two lines", as in Opacus).

>>> import torch
>>> import torch.nn.functional as F
>>> from torch import nn
>>> from torch.utils.data import DataLoader, TensorDataset
>>> from labeldp.dpsgd import make_private
>>> _ = torch.manual_seed(0)
>>> data = TensorDataset(torch.randn(200, 5), torch.randint(0, 3, (200,)))
>>> model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
>>> model, optimizer, loader = make_private(
...     model, optimizer, DataLoader(data, batch_size=20),
...     max_grad_norm=1.0, noise_multiplier=1.1, delta=1e-5, seed=0)
>>> for x, y in loader:  # the loop is unchanged
...     optimizer.zero_grad()
...     loss = F.cross_entropy(model(x), y)
...     loss.backward()
...     optimizer.step()
>>> optimizer.steps, len(loader)  # one epoch: ceil(1/q) = 10 Poisson batches
(10, 10)
>>> 0 < optimizer.epsilon(1e-5) < 3
True

Modules: :mod:`~labeldp.dpsgd.make_private` (the entry point),
:mod:`~labeldp.dpsgd.hooks` (per-example gradients captured in the user's backward, through
the per-layer formulas of :mod:`labeldp.train.per_example`),
:mod:`~labeldp.dpsgd.optimizer` (clip, sum, noise, ÷ q·N, the accountant's step count,
budget, checkpoints), :mod:`~labeldp.dpsgd.loader` (Poisson sampling),
:mod:`~labeldp.dpsgd.virtual` (virtual batches), :mod:`~labeldp.dpsgd.validation`
(``validate``/``fix``), :mod:`~labeldp.dpsgd.layers` (DPLSTM, DPGRU, DPRNN,
DPMultiheadAttention: the torch layers rebuilt from Linears), :mod:`~labeldp.dpsgd.checks`
(argument checks). ``register_grad_sampler`` (from :mod:`labeldp.train.per_example`)
adds per-example gradients for a user-defined layer type.
"""

from ..train.per_example import register_grad_sampler
from .hooks import GradSampleHooks
from .layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention
from .loader import PoissonBatchSampler, PoissonDataLoader
from .make_private import make_private
from .optimizer import BudgetExhausted, DPOptimizer
from .validation import fix, validate
from .virtual import virtual_batches

__all__ = [
    "DPGRU",
    "DPLSTM",
    "DPMultiheadAttention",
    "DPRNN",
    "BudgetExhausted",
    "DPOptimizer",
    "GradSampleHooks",
    "PoissonBatchSampler",
    "PoissonDataLoader",
    "fix",
    "make_private",
    "register_grad_sampler",
    "validate",
    "virtual_batches",
]
