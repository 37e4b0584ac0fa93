"""The private optimizer: the user's optimizer behind per-example clipping and noise.

:class:`DPOptimizer` wraps any ``torch.optim.Optimizer``. Its ``step()`` (after the user's
``loss.backward()``, whose per-example gradients :class:`~labeldp.dpsgd.hooks.GradSampleHooks`
recorded) does, for one logical batch (Abadi et al. 2016):

1. clip every example's gradient to L2 norm at most C = ``max_grad_norm`` over all
   parameters together ("flat" clipping: cᵢ = min(1, C / (‖gᵢ‖ + 1e-6)));
2. sum the clipped gradients (over the physical chunks of a virtual batch, see
   :func:`labeldp.dpsgd.virtual_batches`);
3. add Gaussian noise of standard deviation σ·C to every coordinate of the sum
   (σ = ``noise_multiplier``; drawn parameter by parameter in ``param_groups`` order as
   ``labeldp.mechanisms.randomness.standard_normal(p.shape, generator=noise_generator)``);
4. divide by the *expected* batch size q·N (never the realised one, which depends on
   the sample), write the result to ``p.grad`` and run the wrapped optimizer's step.

An empty batch still takes steps 3-4 (noise only). Every such step is one composition of
the Poisson-subsampled Gaussian mechanism (σ, q) for the relation "add or remove one
example"; ``steps`` counts them and :meth:`DPOptimizer.epsilon` is the ε of that many
steps (labeldp.privacy.dpsgd_accounting.dpsgd_epsilon: dp-accounting's PLD by default).
With ``max_epsilon`` a step that would take ε past it raises :class:`BudgetExhausted`
before anything changes.

PyTorch's contracts are kept: ``param_groups``, ``state`` and ``defaults`` are the wrapped
optimizer's (learning-rate schedulers work), ``zero_grad``, ``step(closure)`` and
``state_dict``/``load_state_dict`` (which carry the step count, the noise generator's
state and the parameters the count is valid for).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim import Optimizer

from ..errors import ConfigError, LabelDPError
from ..mechanisms.randomness import standard_normal
from ..privacy.dpsgd_accounting import MIN_NOISE_MULTIPLIER, dpsgd_epsilon
from .hooks import GradSampleHooks

#: Relative tolerance of the one-time check of the per-example gradients against autograd.
CHECK_RTOL = 1e-3


class BudgetExhausted(LabelDPError):
    """The next DP-SGD step would take ε past the optimizer's ``max_epsilon``."""


class DPOptimizer(Optimizer):
    """DP-SGD around ``optimizer`` (see the module docstring).

    hooks: the model's :class:`GradSampleHooks`. max_grad_norm: C > 0 (per example, L2,
    flat). noise_multiplier: σ ≥ 0 (per step; σ = 0 is not private, ε = ∞).
    sample_rate: q in (0, 1] (per example and step). expected_batch_size: q·N > 0, the
    divisor. delta: δ in (0, 1), the default of :meth:`epsilon` and the budget's δ.
    max_epsilon: None or ε > 0: the budget. accountant: "pld" or "rdp".
    secure_noise: noise from OS entropy; else from ``noise_generator`` (seeded from
    ``seed`` when given: anyone knowing the seed can remove the noise).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        hooks: GradSampleHooks,
        *,
        max_grad_norm: float,
        noise_multiplier: float,
        sample_rate: float,
        expected_batch_size: float,
        delta: float,
        max_epsilon: float | None = None,
        accountant: str = "pld",
        secure_noise: bool = False,
        seed: int | None = None,
    ) -> None:
        # Optimizer.__init__ is not called: the state is the wrapped optimizer's.
        self.original_optimizer = optimizer
        self.hooks = hooks
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.expected_batch_size = float(expected_batch_size)
        self.delta = float(delta)
        self.max_epsilon = max_epsilon
        self.accountant = accountant
        self.secure_noise = bool(secure_noise)
        self.steps = 0
        self._max_steps: int | None = None
        self._skip_next = False
        self._accumulated: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._chunks = 0
        self._checked = False
        params = self.params
        device = params[0].device if params else torch.device("cpu")
        self.noise_generator: torch.Generator | None = None
        if not self.secure_noise:
            self.noise_generator = torch.Generator(device=device)
            if seed is None:
                self.noise_generator.seed()
            else:
                self.noise_generator.manual_seed(seed)

    # ------------------------------------------------------------- the wrapped state
    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.original_optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.original_optimizer.state = value

    @property
    def defaults(self) -> dict:  # type: ignore[override]
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        self.original_optimizer.defaults = value

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The trainable parameters of all param groups, in order."""
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def __repr__(self) -> str:
        return (
            f"DPOptimizer(C={self.max_grad_norm:g}, σ={self.noise_multiplier:g}, "
            f"q={self.sample_rate:g}, steps={self.steps}, {self.original_optimizer!r})"
        )

    def add_param_group(self, param_group: dict) -> None:
        raise ConfigError(
            "add_param_group is not supported on a private optimizer: add the group to the "
            "optimizer before make_private (its per-example gradients must be captured)"
        )

    # ------------------------------------------------------------- the step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """The wrapped optimizer's zero_grad; also forgets the per-example gradients of
        the last backward (never the clipped sums accumulated over a virtual batch)."""
        self.original_optimizer.zero_grad(set_to_none)
        self.hooks.clear_gradients()

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """The next ``step()`` only clips and accumulates (a physical chunk that is not the
        last of its logical batch); set by :func:`labeldp.dpsgd.virtual_batches`."""
        self._skip_next = bool(do_skip)

    def clip_and_accumulate(self) -> int:
        """Clips the recorded per-example gradients and adds their sum to the logical
        batch's; returns the number of examples added."""
        if not self._checked and self.hooks.recorded_batch() >= 2:
            self._check_against_autograd()
        sums, _, batch = self.hooks.clipped_sums(self.max_grad_norm)
        for p in self.params:  # autograd's batch gradient is replaced by the noisy one:
            p.grad = None  # free it now (peak memory of the noise step)
        for p, value in sums.items():
            if p in self._accumulated:
                self._accumulated[p] = self._accumulated[p] + value
            else:
                self._accumulated[p] = value
        self._chunks += 1
        return batch

    def _check_against_autograd(self) -> None:
        """Σᵢ gᵢ from the hooks must equal autograd's ``.grad`` (× B for "mean")."""
        batch = self.hooks.recorded_batch()
        scale = batch if self.hooks.loss_reduction == "mean" else 1
        sums = self.hooks.unclipped_sums()
        diff = total = 0.0
        for p in self.params:
            ours = sums.get(p)
            theirs = None if p.grad is None else p.grad.detach().double() * scale
            if ours is None and theirs is None:
                continue
            ours = torch.zeros_like(p, dtype=torch.float64) if ours is None else ours.double()
            theirs = torch.zeros_like(ours) if theirs is None else theirs
            diff += float((ours - theirs).pow(2).sum())
            total += float(theirs.pow(2).sum())
        if math.sqrt(diff) > CHECK_RTOL * math.sqrt(total) + 1e-6:
            raise ConfigError(
                "the per-example gradients captured by the hooks do not add up to the "
                f"gradient autograd computed (relative difference "
                f"{math.sqrt(diff) / max(math.sqrt(total), 1e-30):.3g}); check that "
                "every parameter is used only inside its own module's forward (no tied or "
                "functionally used weights), that no layer mixes examples (BatchNorm) and "
                "that gradients are zeroed (optimizer.zero_grad()) before each backward"
            )
        self._checked = True

    @torch.no_grad()
    def add_noise(self) -> None:
        """p.grad = (accumulated clipped sum + N(0, σ²C²)) / (q·N) for every parameter."""
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            summed = self._accumulated.get(p)
            if summed is None:
                summed = torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
            noise = standard_normal(
                tuple(p.shape),
                generator=self.noise_generator,
                secure=self.secure_noise,
                device=p.device,
            ).to(summed.dtype)
            # in place: the accumulated sum is not used again (peak memory)
            p.grad = summed.add_(noise, alpha=std).div_(self.expected_batch_size).to(p.dtype)
        self._accumulated = {}
        self._chunks = 0

    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """Runs ``closure`` (with gradients on) if given; clips and accumulates the
        recorded per-example gradients; then, unless :meth:`signal_skip_step` asked to
        skip, adds the noise, steps the wrapped optimizer and counts the step. Returns
        the closure's loss (None when skipped or without closure)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._skip_next:
            self.clip_and_accumulate()
            self._skip_next = False
            return None
        if self.max_epsilon is not None and self.steps + 1 > self.max_steps:
            raise BudgetExhausted(
                f"the privacy budget is spent: {self.steps} steps give ε = "
                f"{self.epsilon():.4g} at δ = {self.delta:g}, one more would exceed "
                f"max_epsilon = {self.max_epsilon:g} (σ = {self.noise_multiplier:g}, "
                f"q = {self.sample_rate:g})"
            )
        self.clip_and_accumulate()
        self.add_noise()
        self.original_optimizer.step()
        self.steps += 1
        return loss

    # ------------------------------------------------------------- accounting
    def epsilon(self, delta: float | None = None) -> float:
        """ε (add/remove one example) of the ``steps`` noisy steps taken, at ``delta``
        (default: the δ given to make_private). 0 before the first step; ∞ for σ below
        labeldp.privacy.dpsgd_accounting.MIN_NOISE_MULTIPLIER (0.01)."""
        return self.epsilon_after(self.steps, delta)

    def epsilon_after(self, steps: int, delta: float | None = None) -> float:
        """ε after ``steps`` noisy steps at this σ and q."""
        delta = self.delta if delta is None else delta
        if steps == 0:
            return 0.0
        if self.noise_multiplier < MIN_NOISE_MULTIPLIER:
            return math.inf
        return dpsgd_epsilon(self.noise_multiplier, self.sample_rate, steps, delta, self.accountant)

    @property
    def max_steps(self) -> int | float:
        """The most steps ``max_epsilon`` allows (∞ without a budget); computed once, by
        doubling then bisection on the step count (ε grows with the steps)."""
        if self.max_epsilon is None:
            return math.inf
        if self._max_steps is None:
            budget = self.max_epsilon
            if self.epsilon_after(1) > budget:
                self._max_steps = 0
            else:
                low, high = 1, 2
                while self.epsilon_after(high) <= budget:
                    low, high = high, high * 2
                    if high > 2**40:
                        break
                while high - low > 1:
                    mid = (low + high) // 2
                    if self.epsilon_after(mid) <= budget:
                        low = mid
                    else:
                        high = mid
                self._max_steps = low
        return self._max_steps

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict plus ``"dpsgd"``: the step count, the noise
        generator's state and (C, σ, q) the count is valid for. Refused in the middle of a
        virtual batch (its clipped sums are not saved)."""
        if self._accumulated or self._skip_next:
            raise ConfigError(
                "state_dict() in the middle of a virtual batch would lose its clipped sums; "
                "save after a full step"
            )
        state = self.original_optimizer.state_dict()
        state["dpsgd"] = {
            "steps": self.steps,
            "noise_generator": (
                None if self.noise_generator is None else self.noise_generator.get_state()
            ),
            "max_grad_norm": self.max_grad_norm,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores what :meth:`state_dict` saved; a ConfigError for a state dict without
        the DP-SGD part or saved for another C, σ or q (the step count would be wrong)."""
        state = dict(state_dict)
        dp = state.pop("dpsgd", None)
        if dp is None:
            raise ConfigError(
                "state_dict has no 'dpsgd' part (it was saved from a non-private optimizer): "
                "the steps already taken would not be accounted"
            )
        for key in ("max_grad_norm", "noise_multiplier", "sample_rate"):
            if not math.isclose(dp[key], getattr(self, key), rel_tol=1e-12):
                raise ConfigError(
                    f"state_dict was saved with {key} = {dp[key]:g}, this optimizer has "
                    f"{getattr(self, key):g}: its step count does not account this setting"
                )
        self.original_optimizer.load_state_dict(state)
        self.steps = int(dp["steps"])
        if dp["noise_generator"] is not None and self.noise_generator is not None:
            self.noise_generator.set_state(dp["noise_generator"])
        self._accumulated = {}
        self._skip_next = False

    def detach(self) -> Optimizer:
        """Removes the hooks from the model; returns the wrapped optimizer."""
        self.hooks.remove()
        return self.original_optimizer
