"""Training configuration: one frozen dataclass, validated early, written into every checkpoint."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from augment_gan.data import FITS, MODEL_RESOLUTIONS
from augment_gan.errors import UserError
from augment_gan.validation import check_types

LOSSES = ("hinge", "nonsaturating")
RESUME_OVERRIDABLE = ("kimg", "minutes", "checkpoint_minutes", "log_every", "num_workers")
"""Config fields a resumed run may change: they set how long and how often, not what is computed."""
DIFFAUG_OPS = ("color", "translation", "cutout")
CLOCKS = ("wall", "cpu")


@dataclass(frozen=True)
class TrainConfig:
    """Everything needed to rebuild a training run; stored as JSON in every checkpoint."""

    # Data.
    resolution: int = 32
    """Square output size in pixels: 32, 64, 128 or 256."""
    fit: str = "center-crop"
    """How non-square images become square: center-crop, pad or resize."""
    background: tuple[int, int, int] = (255, 255, 255)
    """RGB colour that transparent pixels are composited over."""
    conditional: bool = True
    """Class-conditional G and D when the folder has class subfolders."""
    class_sampling: float = 0.5
    """Conditional runs on a folder with unequal classes: class c's real images, and the fake labels alike, are
    drawn with probability ∝ n_c ** class_sampling. 1 follows the folder's frequencies (a class of 4 images
    among 1,000 is seen in 0.4% of the draws and G barely learns it), 0 draws every class equally (D then sees
    a rare class's few images so often that it memorises them), 0.5 is the square-root sampling of the
    long-tail literature. Equal classes and unconditional runs draw uniformly whatever the value."""

    # Budget.
    kimg: float | None = None
    """Stop after this many thousand real images shown to D (global, all ranks)."""
    minutes: float | None = 5.0
    """Stop after this many wall-clock minutes of training (ignored when `kimg` is set)."""
    clock: str = "wall"
    """What `minutes` counts: "wall" (elapsed time) or "cpu" (this process's CPU time, all threads), which
    makes budgets comparable on a shared machine (the benchmarks use it)."""
    batch_size: int = 32
    """Global batch size (split across ranks under torchrun). Small because a short CPU run is limited by
    its number of updates (benchmarks/RESULTS.md, fit); on a GPU larger batches cost little more."""
    seed: int = 0
    """Seeds the networks' initialisation and every random draw of training (same seed, same run)."""

    # Networks.
    z_dim: int = 128
    """Length of the generator's latent vector z."""
    g_channels: int = 256
    """Generator width at 4×4; halves every doubling of resolution, never below `min_channels`."""
    d_channels: int = 32
    """Discriminator width at full resolution; doubles every halving, capped at `max_channels`. 32, not 64:
    D's full-resolution layers dominate a CPU step (benchmarks/RESULTS.md, fit). On ~100 images try 64."""
    min_channels: int = 32
    """Narrowest layer of G and D."""
    max_channels: int = 256
    """Widest layer of G and D."""

    # Optimisation: Adam at twice DCGAN's 2e-4; in short CPU runs the learning rate mattered most
    # (benchmarks/RESULTS.md, fit).
    loss: str = "hinge"
    """Adversarial loss: hinge or nonsaturating."""
    g_lr: float = 4e-4
    """Adam learning rate of G (and E)."""
    d_lr: float = 4e-4
    """Adam learning rate of D."""
    betas: tuple[float, float] = (0.0, 0.99)
    """Adam's (beta1, beta2) for G and D; beta1 0 as in StyleGAN2-ADA."""
    r1_gamma: float = 0.0
    """R1 penalty weight on reals; 0 disables it (D already uses spectral normalisation)."""
    ema_kimg: float = 2.5
    """Half-life of the EMA generator in kimg (StyleGAN2-ADA uses 10 at 256px+; short CPU runs need less)."""
    ema_rampup: float = 0.05
    """EMA half-life is at most `ema_rampup` × kimg so far, so early samples are not stuck at init."""

    # Self-supervised constraints (each 0 disables it). Rotation and completion are off by default: their
    # extra D passes cost steps, and the fit benchmark found no reliable gain in 5 CPU-minutes
    # (benchmarks/RESULTS.md). Turn them on for long (GPU) runs.
    rotation_d_weight: float = 0.0
    """D predicts the rotation (0/90/180/270°) of real images (SSGAN, Chen et al. 2019, uses 1.0)."""
    rotation_g_weight: float = 0.0
    """G is rewarded when D can tell the rotation of its fakes (SSGAN uses 0.2)."""
    completion_weight: float = 0.0
    """D's features reconstruct a masked region of real images, loss ½‖x̄ − x̂‖² on the region (try 1.0)."""
    encoder_weight: float = 1.0
    """Train the VAE-style latent encoder E, which `vary` needs; E's loss never changes G or D, but its
    passes cost G/D steps, hence `encoder_interval`."""
    encoder_kl_weight: float = 0.01
    """Weight of E's KL term towards the N(0, I) prior of z (its reconstruction term has weight 1)."""
    encoder_interval: int = 4
    """Train E on every this-many-th step only: trades a little of E's fit for G/D steps (measured in
    benchmarks/RESULTS.md, fit)."""
    mode_seeking_weight: float = 0.5
    """Weight of the mode-seeking term (MSGAN, Mao et al. 2019): G is penalised when two latents of one
    class give similar images. Without it a conditional G on a small folder maps every latent of a class to
    one image, which barely helps a classifier (benchmarks/RESULTS.md, few-shot). Costs no extra pass."""
    class_d_weight: float = 0.0
    """Conditional runs: weight of an auxiliary classifier head on D's features (AC-GAN, Odena et al. 2017),
    trained with cross-entropy on the augmented real images only, so it learns the classes from the data
    and not from G's mistakes. Costs one linear layer: it reads the features D computes anyway."""
    class_g_weight: float = 0.0
    """Conditional runs: G is penalised (cross-entropy) when D's auxiliary classifier puts a fake in
    another class than the one it was asked for — aimed at a small folder's samples that drift into a
    neighbouring class (a 0 that looks like an 8). Needs a trained head: set `class_d_weight` too."""
    selfsup_fraction: float = 0.25
    """Share of each batch the self-supervised passes and the encoder see (each pass costs extra D or G
    work; a quarter keeps their total cost below one adversarial D pass)."""

    # Differentiable augmentation of D's inputs (DiffAugment, Zhao et al. 2020) with adaptive p (ADA, Karras et al. 2020).
    diffaug: tuple[str, ...] = ("translation",)
    """DiffAugment operations applied to every image D sees: any of color, translation, cutout. Translation
    alone by default: with color at the p that ADA reaches in a few thousand CPU steps (0.6-0.8), D can no
    longer see a brightness or contrast error, G drifts into blotchy samples and FD rises along the run
    (`bench_fit.py`, variants `all-ops` and `color-only`, in benchmarks/RESULTS.md)."""
    ada_target: float = 0.6
    """Target of r_t = E[sign(D(real))]; above it D overfits and p rises (ADA paper: 0.6)."""
    ada_kimg: float = 20.0
    """p can move from 0 to 1 within this many kimg (ADA uses 500; CPU runs are ~100 kimg long)."""
    ada_interval: int = 4
    """Update the augmentation probability p every this many steps."""
    ada_p_init: float = 0.0
    """Augmentation probability p at the start of training."""
    ada_p_max: float = 0.8
    """Upper bound of p: above it augmentations start to leak into G's samples (ADA paper)."""
    fixed_p: float | None = None
    """Use this constant augmentation probability instead of adapting it."""

    # Bookkeeping.
    checkpoint_minutes: float = 10.0
    """Save a checkpoint (and sample grid) every this many minutes, and always at the end."""
    log_every: int = 20
    """Write a JSONL log line every this many steps."""
    grid_size: int = 8
    """Samples per row of the sample grids (one row per class when conditional, at most 16 rows)."""
    num_workers: int = 0
    """Unused: batches are read from the memory-mapped cache in the training process (kept so configs load)."""

    def __post_init__(self) -> None:
        check_types(self)  # first: the checks below compare values, which needs the right types
        if self.resolution not in MODEL_RESOLUTIONS:
            raise UserError(f"resolution must be one of {MODEL_RESOLUTIONS}, got {self.resolution}")
        if self.fit not in FITS:
            raise UserError(f"fit must be one of {FITS}, got {self.fit!r}")
        if self.loss not in LOSSES:
            raise UserError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.kimg is None and self.minutes is None:
            raise UserError("set a training budget: --kimg or --minutes")
        if self.kimg is not None and self.kimg <= 0:
            raise UserError(f"kimg must be positive, got {self.kimg}")
        if self.minutes is not None and self.minutes <= 0:
            raise UserError(f"minutes must be positive, got {self.minutes}")
        if self.clock not in CLOCKS:
            raise UserError(f"clock must be one of {CLOCKS}, got {self.clock!r}")
        if self.batch_size < 2:
            raise UserError(f"batch size must be at least 2, got {self.batch_size}")
        unknown = set(self.diffaug) - set(DIFFAUG_OPS)
        if unknown:
            raise UserError(f"unknown diffaug ops {sorted(unknown)}; choose from {DIFFAUG_OPS}")
        if self.encoder_interval < 1:
            raise UserError(f"encoder_interval must be >= 1, got {self.encoder_interval}")
        if not 0 < self.selfsup_fraction <= 1:
            raise UserError(f"selfsup_fraction must be in (0, 1], got {self.selfsup_fraction}")
        if not 0 <= self.class_sampling <= 1:
            raise UserError(f"class_sampling must be in [0, 1], got {self.class_sampling}")
        if self.fixed_p is not None and not 0 <= self.fixed_p <= 1:
            raise UserError(f"fixed_p must be in [0, 1], got {self.fixed_p}")
        for name in ("rotation_d_weight", "rotation_g_weight", "completion_weight", "encoder_weight",
                     "encoder_kl_weight", "mode_seeking_weight", "class_d_weight", "class_g_weight",
                     "r1_gamma", "g_lr", "d_lr"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"seed must be in [0, 2**63), got {self.seed}")
        for name in ("z_dim", "g_channels", "d_channels", "min_channels", "max_channels", "ada_interval",
                     "log_every", "grid_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_channels > self.max_channels:
            raise UserError(f"min_channels ({self.min_channels}) must not exceed max_channels ({self.max_channels})")
        if self.num_workers < 0:
            raise UserError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.checkpoint_minutes <= 0:
            raise UserError(f"checkpoint_minutes must be positive, got {self.checkpoint_minutes}")
        if self.ada_kimg <= 0:
            raise UserError(f"ada_kimg must be positive, got {self.ada_kimg}")
        for name in ("ema_kimg", "ema_rampup"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("ada_target", "ada_p_init", "ada_p_max"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not all(0 <= v <= 255 for v in self.background):
            raise UserError(f"background must be three integers in 0..255, got {list(self.background)}")
        if not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.class_g_weight > 0 and self.class_d_weight == 0:
            raise UserError("class_g_weight needs class_d_weight > 0 (the classifier G answers to must learn)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build a config from a mapping; unknown keys are an error, lists become tuples."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown config keys: {', '.join(unknown)}")
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        try:
            return cls(**clean)
        except TypeError as exc:
            raise UserError(f"bad config: {exc}") from None

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def run_differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    """The fields, other than `RESUME_OVERRIDABLE`, in which two configs differ: any means another run."""
    return [f.name for f in fields(TrainConfig)
            if f.name not in RESUME_OVERRIDABLE and getattr(a, f.name) != getattr(b, f.name)]


def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), on one line."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def first_sentence(text: str) -> str:
    """Up to the first full stop outside parentheses that ends a sentence ("et al. 2019)" does not)."""
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "." and depth == 0 and (i + 1 == len(text) or text[i + 1] == " "):
            return text[: i + 1]
    return text


def config_yaml(config: TrainConfig | None = None) -> str:
    """`config` (default: the defaults) as a YAML file that `fit --config` loads: every field, in order,
    under a comment with the first sentence of its doc (`augment-gan fit --print-config`)."""
    config = config if config is not None else TrainConfig()
    docs = field_docs()
    lines = ["# TrainConfig for `augment-gan fit --config FILE` (options given on the command line win).",
             "# Delete what you do not change; a missing field keeps its default."]
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        if f.name in docs:
            lines.append(f"# {first_sentence(docs[f.name])}")
        dumped = yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True,
                                allow_unicode=True, width=1000)
        lines.append(f"{f.name}: {dumped.removesuffix(chr(10)).removesuffix('...').strip()}")
    return "\n".join(lines) + "\n"


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (safe-loaded) into a dict of TrainConfig overrides."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of TrainConfig fields")
    return data
