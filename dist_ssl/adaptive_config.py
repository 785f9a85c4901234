"""Settings of the adaptive-threshold methods (`method.freematch`, `method.softmatch`,
`method.flexmatch`): sections of the one config tree (dist_ssl.config), kept here to keep that file
short."""

from __future__ import annotations

from dataclasses import dataclass

from dist_ssl.errors import UserError


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"config key '{key}' {message}")


@dataclass
class FreeMatchConfig:
    """FreeMatch (Wang et al. 2023), USB's settings: methods/freematch.py."""

    ema_decay: float = 0.999  # lambda: of the global threshold, the class distribution and the class histogram
    unlabeled_weight: float = 1.0  # lambda_u
    fairness_weight: float = 0.01  # of the self-adaptive fairness loss (USB's ent_loss_ratio); 0 = off

    def __post_init__(self):
        _check(0 <= self.ema_decay < 1, "method.freematch.ema_decay", "must be in [0, 1)")
        _check(self.fairness_weight >= 0, "method.freematch.fairness_weight", "must be >= 0")


@dataclass
class SoftMatchConfig:
    """SoftMatch (Chen et al. 2023), USB's settings: methods/softmatch.py."""

    ema_decay: float = 0.999  # of the confidence's mean and variance and of the mean class probabilities
    n_sigma: float = 2.0  # n: the weight falls to exp(-n^2/2) one standard deviation below the mean confidence
    unlabeled_weight: float = 1.0  # lambda_u
    uniform_alignment: bool = True  # align the weak view's probabilities to the uniform class distribution

    def __post_init__(self):
        _check(0 <= self.ema_decay < 1, "method.softmatch.ema_decay", "must be in [0, 1)")
        _check(self.n_sigma > 0, "method.softmatch.n_sigma", "must be positive")


@dataclass
class FlexMatchConfig:
    """FlexMatch (Zhang et al. 2021), the paper's settings: methods/flexmatch.py."""

    threshold: float = 0.95  # tau: the highest class threshold, and the confidence that updates a sample's status
    unlabeled_weight: float = 1.0  # lambda_u
    warmup: bool = True  # count the samples without a confident prediction yet (low thresholds early)
    # FlexMatch keeps one entry per unlabeled sample on every rank and in every checkpoint (1 byte, 2
    # above 127 classes): a bigger pool is refused (FreeMatch needs no per-sample state).
    max_pool_size: int = 10_000_000

    def __post_init__(self):
        _check(0 < self.threshold <= 1, "method.flexmatch.threshold", "must be in (0, 1]")
        _check(self.max_pool_size >= 1, "method.flexmatch.max_pool_size", "must be >= 1")
