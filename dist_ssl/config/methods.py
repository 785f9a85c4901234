"""The methods' sections of the config tree (`method.<name>.*`), one dataclass per method; the tree
and its loading are in `dist_ssl/config/__init__.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dist_ssl.errors import check_config


@dataclass
class PseudoLabelConfig:
    """Lee (2013): loss = CE(labeled) + alpha(t) * CE(unlabeled, argmax of own prediction)."""

    alpha_final: float = 3.0  # alpha_f
    ramp_start_epoch: float = 100.0  # T1: alpha = 0 before
    ramp_end_epoch: float = 600.0  # T2: alpha = alpha_f after
    threshold: float = 0.0  # optional confidence mask on pseudo-labels (0 = Lee's original)

    def __post_init__(self):
        check_config(self.ramp_end_epoch >= self.ramp_start_epoch, "method.pseudo_label.ramp_end_epoch", "must be >= ramp_start_epoch")
        check_config(0 <= self.threshold < 1, "method.pseudo_label.threshold", "must be in [0, 1)")


@dataclass
class FixMatchConfig:
    threshold: float = 0.95  # tau
    unlabeled_weight: float = 1.0  # lambda_u
    temperature: float = 1.0  # of the weak-view softmax used for the confidence
    distribution_alignment: float = 0.0  # as method.mpl's (ReMixMatch; FixMatch + DA in USB); 0 = off

    def __post_init__(self):
        check_config(0 <= self.threshold <= 1, "method.fixmatch.threshold", "must be in [0, 1]")
        check_config(self.temperature > 0, "method.fixmatch.temperature", "must be positive")
        check_config(0 <= self.distribution_alignment < 1, "method.fixmatch.distribution_alignment", "must be in [0, 1)")


@dataclass
class MPLConfig:
    """Meta Pseudo Labels (Pham et al. 2021); defaults are kekmodel's CIFAR-10-4K settings."""

    # hard: the argmax of the teacher on the strong view (kekmodel); sampled: a class drawn from the
    # teacher's softmax (the paper's definition: the feedback term is then an unbiased gradient of the
    # student's expected labeled loss after its step); soft: the student learns the teacher's softmax
    # (official code), where a scalar feedback carries no gradient, so the teacher gets none.
    pseudo_labels: Literal["hard", "sampled", "soft"] = "hard"
    # The view the teacher labels, and whose prediction its feedback term reinforces (the same one,
    # so that the term is the gradient it should be); the student always learns its strong view.
    # MPL: strong (paper, official code); SMPL: weak (the replication's step 1, FixMatch-like).
    pseudo_label_view: Literal["weak", "strong"] = "strong"
    label_smoothing: float = 0.15  # of the teacher's labeled loss and the student's pseudo-label loss
    temperature: float = 0.7  # UDA: sharpening of the teacher's weak-view targets
    threshold: float = 0.6  # UDA: confidence mask on those targets
    uda_weight: float = 8.0  # lambda_u, reached after uda_steps (linear ramp from step 1)
    uda_steps: int = 5000
    baseline_decay: float = 0.0  # moving average of the feedback subtracted from it (official: 0.99); 0 = off
    # Multiplies the teacher's feedback term h * mean CE. 1 is both references' scale; the global
    # unlabeled batch size makes the term the exact gradient of the student's post-step labeled loss
    # (methods/mpl.py), 1/N of which the mean gives.
    feedback_weight: float = 1.0
    # Distribution alignment (ReMixMatch): the pseudo-labeler's class probabilities are multiplied by
    # (class distribution of the labels) / (its mean prediction on the unlabeled batches), both moving
    # averages with this decay over the global batch; 0 = off. Keeps self-training from drifting to
    # one class (methods/alignment.py).
    distribution_alignment: float = 0.0

    def __post_init__(self):
        name = type(self).__name__.removesuffix("Config").lower()
        check_config(0 <= self.label_smoothing < 1, f"method.{name}.label_smoothing", "must be in [0, 1)")
        check_config(self.temperature > 0, f"method.{name}.temperature", "must be positive")
        check_config(0 <= self.threshold <= 1, f"method.{name}.threshold", "must be in [0, 1]")
        check_config(self.uda_weight >= 0, f"method.{name}.uda_weight", "must be >= 0")
        check_config(self.uda_steps >= 1, f"method.{name}.uda_steps", "must be >= 1")
        check_config(0 <= self.baseline_decay < 1, f"method.{name}.baseline_decay", "must be in [0, 1)")
        check_config(self.feedback_weight >= 0, f"method.{name}.feedback_weight", "must be >= 0")
        check_config(0 <= self.distribution_alignment < 1, f"method.{name}.distribution_alignment", "must be in [0, 1)")


@dataclass
class SMPLConfig(MPLConfig):
    """Self Meta Pseudo Labels (seed 002): MPL's losses on one network, with the moving baseline on."""

    baseline_decay: float = 0.99
    pseudo_label_view: Literal["weak", "strong"] = "weak"


@dataclass
class FreeMatchConfig:
    """FreeMatch (Wang et al. 2023), USB's settings: methods/freematch.py."""

    ema_decay: float = 0.999  # lambda: of the global threshold, the class distribution and the class histogram
    unlabeled_weight: float = 1.0  # lambda_u
    fairness_weight: float = 0.01  # of the self-adaptive fairness loss (USB's ent_loss_ratio); 0 = off

    def __post_init__(self):
        check_config(0 <= self.ema_decay < 1, "method.freematch.ema_decay", "must be in [0, 1)")
        check_config(self.fairness_weight >= 0, "method.freematch.fairness_weight", "must be >= 0")


@dataclass
class SoftMatchConfig:
    """SoftMatch (Chen et al. 2023), USB's settings: methods/softmatch.py."""

    ema_decay: float = 0.999  # of the confidence's mean and variance and of the mean class probabilities
    n_sigma: float = 2.0  # n: the weight falls to exp(-n^2/2) one standard deviation below the mean confidence
    unlabeled_weight: float = 1.0  # lambda_u
    uniform_alignment: bool = True  # align the weak view's probabilities to the uniform class distribution

    def __post_init__(self):
        check_config(0 <= self.ema_decay < 1, "method.softmatch.ema_decay", "must be in [0, 1)")
        check_config(self.n_sigma > 0, "method.softmatch.n_sigma", "must be positive")


@dataclass
class FlexMatchConfig:
    """FlexMatch (Zhang et al. 2021), the paper's settings: methods/flexmatch.py."""

    threshold: float = 0.95  # tau: the highest class threshold, and the confidence that updates a sample's status
    unlabeled_weight: float = 1.0  # lambda_u
    warmup: bool = True  # count the samples without a confident prediction yet (low thresholds early)
    distribution_alignment: float = 0.0  # as method.fixmatch's (ReMixMatch), before thresholds and statuses read the weak view; 0 = off
    # FlexMatch keeps one entry per unlabeled sample on every rank and in every checkpoint (1 byte, 2
    # above 127 classes): a bigger pool is refused (FreeMatch needs no per-sample state).
    max_pool_size: int = 10_000_000

    def __post_init__(self):
        check_config(0 < self.threshold <= 1, "method.flexmatch.threshold", "must be in (0, 1]")
        check_config(self.max_pool_size >= 1, "method.flexmatch.max_pool_size", "must be >= 1")
        check_config(0 <= self.distribution_alignment < 1, "method.flexmatch.distribution_alignment", "must be in [0, 1)")
