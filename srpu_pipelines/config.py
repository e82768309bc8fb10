"""Typed parameters: params.yaml parsed into pydantic models.

Every knob of the pipeline lives in params.yaml. ``load_params`` reads it, applies
``key.path=value`` overrides (from CLI flags), and validates the result. An unknown key
or a bad value raises :class:`ParamsError` with the dotted key that is wrong.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from srpu_pipelines.errors import UserError

# painted masks: anti-aliased edges and JPEG smear stay within a quarter of the range of
# the colour they belong to; pure colours of different classes are much further apart
COLOR_TOLERANCE = 64
IGNORE_INDEX = 255  # class-index value for pixels that are not labelled (info bars, unpainted)
# names of the per-pixel uncertainty maps and their boundary-restricted variants; the maps
# themselves are registered in active_learning/uncertainty.py (a test checks both agree)
PIXEL_UNCERTAINTIES = ("entropy", "least_confidence", "margin", "variance")
UNCERTAINTY_STRATEGIES = PIXEL_UNCERTAINTIES + tuple(f"boundary_{k}" for k in PIXEL_UNCERTAINTIES)
# selection strategies, registered in active_learning/strategies.py (checked at its import)
SELECTION_STRATEGIES = (
    "random",
    *UNCERTAINTY_STRATEGIES,
    "weighted",
    "coreset",
    "kmeans",
    "cold_start",
    "typiclust",
    "probcover",
    "rare",
    "auto",
)


class ParamsError(UserError, ValueError):
    """A params file that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


RGB = tuple[int, int, int]


class ClassSpec(_Strict):
    name: str = Field(min_length=1)
    color: RGB = Field(description="display colour (R, G, B), also used to decode colour masks")

    @field_validator("color")
    @classmethod
    def _rgb_range(cls, v: RGB) -> RGB:
        if any(c < 0 or c > 255 for c in v):
            raise ValueError(f"colour components must be 0..255, got {list(v)}")
        return v


class MaskParams(_Strict):
    # index: pixel value = class index; color: RGB matched to class colours;
    # grey: pixel grey level looked up in ``grey_levels`` (one level per class, in order).
    encoding: Literal["index", "color", "grey"] = "color"
    default_class: str | None = Field(
        default=None, description="class for pixels matching no colour (hand-painted masks)"
    )
    ignore_color: RGB | None = Field(
        default=None, description="colour meaning 'not labelled' (excluded from loss/metrics)"
    )
    grey_levels: list[int] | None = None
    suffix: str = "_mask"
    color_tolerance: int = Field(
        default=COLOR_TOLERANCE,
        ge=0,
        le=127,
        description="a colour with every channel within this of one class colour (or the "
        "ignore colour) is that class: anti-aliased brush edges, light JPEG smear; 0 = exact",
    )


class DatasetSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    labeled: Path | None = Field(default=None, description="folder of NAME.ext + NAME_mask.ext")
    masks: Path | None = Field(
        default=None, description="optional separate folder of masks named like the images"
    )
    raw: Path | None = Field(default=None, description="folder of unlabelled pool images")
    pixel_size_nm: float | None = Field(
        default=None, gt=0, description="pixel size in nm, when known (null = unknown)"
    )
    data_bar: Literal["auto", "none"] | Annotated[int, Field(ge=0)] = Field(
        default="auto",
        description="the instrument's data bar at the bottom of each image: auto (the FEI "
        "tag, else detected), none, or a fixed number of rows",
    )


class SplitParams(_Strict):
    val: float = Field(default=0.2, ge=0.0, lt=1.0)
    test: float = Field(default=0.2, ge=0.0, lt=1.0)
    split_file: Path | None = Field(default=None, description="JSON {split: [names]} to honour")
    record: Path | None = Field(
        default=None,
        description="JSON {image id: split} of every split ever given, written by srpu index "
        "and read back first: keep it with the labels (inside the DVC-tracked labelled "
        "folder, or in git) so that a fresh clone or a removed index keeps every split",
    )
    rare_fraction: float = Field(
        default=0.05, gt=0.0, lt=1.0, description="classes below this pixel share are 'rare'"
    )

    @model_validator(mode="after")
    def _fractions(self) -> SplitParams:
        if self.val + self.test >= 1.0:
            raise ValueError("val + test must leave room for a train split (sum < 1)")
        return self


class DataParams(_Strict):
    datasets: list[DatasetSpec] = Field(min_length=1)
    index_path: Path = Path("outputs/index.json")
    on_bad_input: Literal["error", "skip"] = "error"
    split: SplitParams = SplitParams()

    @field_validator("datasets")
    @classmethod
    def _unique(cls, v: list[DatasetSpec]) -> list[DatasetSpec]:
        names = [d.name for d in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sub-dataset names must be unique, repeated: {dup}")
        return v

    @model_validator(mode="after")
    def _record_outside_the_image_folders(self) -> DataParams:
        rec = self.split.record
        if rec is None:
            return self
        for d in self.datasets:
            for folder in (d.labeled, d.masks, d.raw):
                if folder is not None and Path(rec).parent == Path(folder):
                    raise ValueError(
                        f"data.split.record {rec} lies in sub-dataset {d.name!r}'s image "
                        "folder, where it would be read as an image; put it one folder up "
                        "(e.g. beside the sub-dataset folders, inside the tracked folder)"
                    )
        return self


class ModelParams(_Strict):
    """The network. ``model: auto`` (or ``encoder: auto`` / ``decoder_channels: auto``)
    leaves its size to the plan: the largest of a ladder the budget still trains for
    enough steps (training/plan.py, ``plan_model``)."""

    arch: str = "unet"
    encoder: str = Field(default="resnet18", description="smp encoder, tu-<timm model> or auto")
    in_channels: int = Field(default=1, ge=1, le=4)
    encoder_depth: int = Field(default=5, ge=3, le=5)
    decoder_channels: list[int] | None | Literal["auto"] = Field(
        default=None, description="U-Net-family decoder widths, one per encoder stage, or auto"
    )
    weights: Path | None = Field(default=None, description="local state_dict to start from")
    full_res_skip: int = Field(
        default=0,
        ge=0,
        le=64,
        description="unet: channels of a full-resolution skip from the input (0: none)",
    )

    @model_validator(mode="before")
    @classmethod
    def _auto(cls, v: Any) -> Any:
        if v == "auto":  # model: auto = the plan picks encoder and decoder widths
            return {"encoder": "auto", "decoder_channels": "auto"}
        return v

    @property
    def is_auto(self) -> bool:
        return self.encoder == "auto" or self.decoder_channels == "auto"

    @model_validator(mode="after")
    def _decoder(self) -> ModelParams:
        if self.arch != "unet" and self.is_auto:
            raise ValueError(
                f"auto sizes a unet (its ladder); arch {self.arch!r} needs explicit sizes"
            )
        if self.full_res_skip and self.arch != "unet":
            raise ValueError(f"full_res_skip applies to unet, not {self.arch!r}")
        widths = self.decoder_channels
        if isinstance(widths, list) and len(widths) != self.encoder_depth:
            raise ValueError(
                f"decoder_channels needs {self.encoder_depth} entries (encoder_depth), "
                f"got {len(self.decoder_channels)}"
            )
        return self


class AugmentParams(_Strict):
    flips: bool = True
    rotate90: bool = True
    brightness_contrast: float = Field(default=0.2, ge=0.0, le=1.0)
    gamma: float = Field(default=0.2, ge=0.0, le=1.0)
    noise: float = Field(default=0.03, ge=0.0, le=1.0, description="max Gaussian noise std")
    blur: float = Field(default=0.2, ge=0.0, le=1.0, description="probability of a blur")


class LossParams(_Strict):
    ce_weight: float = Field(default=1.0, ge=0.0)
    dice_weight: float = Field(default=1.0, ge=0.0)
    class_weights: list[Annotated[float, Field(gt=0)]] | None | Literal["auto"] = Field(
        default=None, description="cross-entropy weight per class, null (equal) or auto"
    )
    skeleton_weight: float = Field(
        default=0.0,
        ge=0.0,
        description="weight of the skeleton-recall term (thin phases: the share of each "
        "labelled object's centre line the prediction covers)",
    )
    skeleton_classes: list[str] = Field(
        default_factory=list, description="classes the skeleton-recall term is for"
    )
    lovasz_weight: float = Field(
        default=0.0,
        ge=0.0,
        description="weight of the Lovasz-softmax term (a smooth surrogate of each present "
        "class's IoU over the batch)",
    )

    @model_validator(mode="after")
    def _some(self) -> LossParams:
        if self.ce_weight == 0 and self.dice_weight == 0:
            raise ValueError("ce_weight and dice_weight cannot both be 0")
        if self.skeleton_weight > 0 and not self.skeleton_classes:
            raise ValueError("skeleton_weight > 0 needs skeleton_classes (class names)")
        return self


class SemiParams(_Strict):
    """Semi-supervised training on the unlabelled pool (FixMatch-style): the model's own
    prediction on a weakly augmented tile is the target, where it is confident, for the
    same tile strongly augmented (photometric changes and cut-out)."""

    enabled: bool = False
    threshold: float = Field(
        default=0.9, gt=0, lt=1, description="pseudo-label where max softmax >= this"
    )
    weight: float = Field(default=1.0, ge=0, description="unlabelled loss weight")
    batch_size: int | None = Field(
        default=None, ge=1, description="unlabelled tiles per step (null = half train.batch_size)"
    )
    class_balance: bool = Field(
        default=True,
        description="weight pseudo-labelled pixels by inverse class share (rare phases)",
    )
    rampup_steps: int = Field(
        default=20, ge=0, description="the unlabelled weight rises linearly over these steps"
    )
    include_labeled_splits: list[str] = Field(
        default_factory=list,
        description="labelled splits whose images (not masks) join the unlabelled pool",
    )
    cutout: float = Field(
        default=0.25, ge=0, lt=1, description="side of the cut-out square, share of the tile"
    )
    strength: float = Field(
        default=0.4, ge=0, le=1, description="photometric strength of the strong augmentation"
    )


PrecisionName = Literal["auto", "bf16", "fp16", "fp32"]
Switch = Literal["auto", "on", "off"]
_PRECISION_HELP = (
    "auto: bfloat16 autocast where the hardware runs it natively (CUDA compute capability "
    ">= 8, a CPU with AVX512-BF16/AMX), float16 with a gradient scaler on older GPUs, else "
    "float32 | bf16 | fp16 (CUDA only) | fp32"
)
_DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"
_DEVICE_HELP = "auto (the first CUDA device when there is one, else the CPU) | cpu | cuda | cuda:N"


class LoopParams(_Strict):
    """What every training run of the one loop takes (supervised stages and MAE): its
    budget, optimiser schedule, checkpoints and where it runs."""

    out_dir: Path = Path("outputs/train")
    epochs: int = Field(default=20, ge=1)
    steps_per_epoch: int = Field(default=50, ge=1)
    max_steps: int | None = Field(
        default=None, ge=1, description="step budget (null = epochs x steps_per_epoch)"
    )
    budget_s: float | None = Field(default=None, gt=0, description="wall-clock cap on training")
    batch_size: int = Field(default=8, ge=1, description="global batch (over all processes)")
    tile_size: int = Field(default=256, ge=32, multiple_of=32)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    min_lr_ratio: float = Field(default=0.02, ge=0, le=1)
    resume: bool = True
    precision: PrecisionName = Field(default="auto", description=_PRECISION_HELP)
    device: str = Field(default="auto", pattern=_DEVICE_PATTERN, description=_DEVICE_HELP)
    channels_last: Switch = Field(
        default="auto", description="NHWC memory layout (auto: on; faster convolutions)"
    )
    compile: Switch = Field(
        default="auto",
        description="torch.compile the model (auto: on CUDA only; on a CPU the compile "
        "takes about a minute and paid back less than that, see the README)",
    )
    workers: int | Literal["auto"] = Field(
        default="auto",
        description="DataLoader worker processes (auto: 0 on a CPU with under 8 cores, "
        "where a worker takes a core from the model, else up to 4)",
    )
    threads: int = Field(default=0, ge=0, description="torch threads; 0 = all cores")
    sync_bn: Switch = Field(
        default="auto",
        description="with several GPU processes, BatchNorm statistics over the global batch "
        "(auto: on there; CPU processes keep their own, SyncBatchNorm runs on GPUs only)",
    )
    ema: Annotated[float, Field(ge=0, lt=1)] | Literal["auto"] = Field(
        default=0.0,
        description="decay of an exponential moving average of the weights, which is what "
        "validation scores and best.pt keeps (0: off; auto: the plan, from the steps)",
    )
    checkpoint_every_s: float = Field(
        default=30,
        ge=0,
        description="write last.pt (and a new best.pt) after an epoch once this many seconds "
        "have passed since the last write (0: after every epoch); the end of a run is always "
        "written. An interrupted run resumes from the last write.",
    )

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("must be >= 0 or auto")
        return v

    @property
    def total_steps(self) -> int:
        return self.max_steps or self.epochs * self.steps_per_epoch


Auto = Literal["auto"]
# keys of a training stage that take ``auto``: the plan (training/plan.py) sets them from
# the data's fingerprint, the budget and the device; an explicit value wins
PLANNED_TRAIN_KEYS = (
    "tile_size",
    "batch_size",
    "lr",
    "warmup_steps",
    "rare_crop_prob",
    "val_every",
    "ema",
    "loss",
    "loss.class_weights",
    "augment",
    "resample_nm",
    "upsample",
)


class TrainParams(LoopParams):
    batch_size: Annotated[int, Field(ge=1)] | Auto = Field(
        default=8, description="global batch (over all processes), or auto (the plan)"
    )
    tile_size: Annotated[int, Field(ge=32, multiple_of=32)] | Auto = 256
    lr: Annotated[float, Field(gt=0)] | Auto = 1e-3
    warmup_steps: Annotated[int, Field(ge=0)] | Auto = 20
    rare_crop_prob: Annotated[float, Field(ge=0, le=1)] | Auto = Field(
        default=0.5, description="share of crops centred on a pixel of a drawn class"
    )
    loss: LossParams | Auto = LossParams()
    augment: AugmentParams | Auto = AugmentParams()
    splits: list[str] = Field(default_factory=lambda: ["train"], min_length=1)
    val_split: str = "val"
    val_every: Annotated[int, Field(ge=1)] | Auto = Field(
        default=1, description="validate every N epochs (and the last)"
    )
    ema: Annotated[float, Field(ge=0, lt=1)] | Auto = Field(
        default=0.0, description="weight-average decay (0: off; auto: the plan)"
    )
    resample_nm: Annotated[float, Field(gt=0)] | Auto | None = Field(
        default=None,
        description="train at pixels of this size in nm: images of known pixel size are "
        "resampled to it, and the model (its checkpoint records the size) resamples new "
        "images to it and its predictions back (null: every image at its own pixels; auto: "
        "the plan, when the sub-datasets' pixel sizes differ)",
    )
    upsample: Annotated[float, Field(ge=1, le=4)] | Auto = Field(
        default=1.0,
        description="enlarge every image by this factor (after resample_nm) before the "
        "network, masks by nearest neighbour; the checkpoint records it and inference "
        "enlarges new images alike and brings the probabilities back (1: none; auto: the "
        "plan, 2 for a class under 8 px thick when the time budget affords it)",
    )
    val_time_share: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="skip an epoch's validation while validation has taken more than this "
        "share of the elapsed time (the last epoch always validates)",
    )
    keep_start: bool = Field(
        default=False,
        description="a run that starts from a whole trained model (a round warm from the "
        "champion, a later stage) scores its start weights on validation before the first "
        "step; they stay the best checkpoint unless training beats them",
    )
    datasets: list[str] | None = Field(
        default=None, description="sub-datasets to train on (null = all of data.datasets)"
    )
    encoder: Literal["full", "frozen", "differential"] = Field(
        default="full",
        description="full: encoder trains at lr; frozen: fixed weights and BN statistics; "
        "differential: encoder at lr x encoder_lr_mult",
    )
    encoder_lr_mult: float = Field(default=0.1, gt=0, le=1)
    semi: SemiParams = SemiParams()

    @property
    def resample_size(self) -> float | None:
        """``resample_nm`` as a size in nm, or None: each image at its own pixels (also
        while it is still ``auto``, before the plan has set it)."""
        v = self.resample_nm
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

    @property
    def upsample_factor(self) -> float:
        """``upsample`` as a factor: 1 while it is still ``auto`` (before the plan)."""
        v = self.upsample
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 1.0


class PretrainParams(LoopParams):
    """Masked-image-modelling pretraining (MAE) of the segmentation model's encoder.

    ``method: auto`` picks ``vit`` (true MAE: masked patches dropped) for ViT encoders and
    ``cnn`` (SparK / FCMAE-style: masked patches zeroed and kept zero after every
    convolution) for CNN encoders."""

    out_dir: Path = Path("outputs/mae")
    method: Literal["auto", "cnn", "vit"] = "auto"
    mask_ratio: float = Field(default=0.6, gt=0, lt=1)
    patch_size: int = Field(
        default=32,
        ge=4,
        description="masking patch side in px; a multiple of the encoder's output stride "
        "(cnn) or patch size (vit)",
    )
    epochs: int = Field(default=10, ge=1)
    steps_per_epoch: int = Field(default=20, ge=1)
    tile_size: int = Field(default=128, ge=32, multiple_of=32)
    lr: float = Field(default=1.5e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    decoder_dim: int = Field(default=128, ge=8)
    decoder_depth: int = Field(default=2, ge=1, le=8)
    norm_pix_loss: bool = Field(default=True, description="targets normalised per patch")
    splits: list[str] = Field(
        default_factory=lambda: ["train", "val"],
        description="labelled splits whose images (not masks) join the pool",
    )
    use_pool: bool = Field(default=True, description="train on the unlabelled pool images")
    reconstructions: int = Field(default=4, ge=0, description="pictures written at the end")

    @model_validator(mode="after")
    def _tiles(self) -> PretrainParams:
        if self.tile_size % self.patch_size:
            raise ValueError(
                f"pretrain.tile_size ({self.tile_size}) must be a multiple of "
                f"pretrain.patch_size ({self.patch_size})"
            )
        return self


_INIT_HELP = "random | mae | previous | alias:<registry alias> | file:<path>"


class StageSpec(_Strict):
    """One training stage: ``train`` overrides keys of the top-level ``train`` section."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    init: str = Field(default="random", description=_INIT_HELP)
    train: dict[str, Any] = Field(default_factory=dict)

    @field_validator("init")
    @classmethod
    def _init(cls, v: str) -> str:
        kind, _, arg = v.partition(":")
        if kind in ("random", "mae", "previous") and not arg:
            return v
        if kind in ("alias", "file") and arg:
            return v
        raise ValueError(f"unknown start {v!r}; valid: {_INIT_HELP}")

    @property
    def init_kind(self) -> str:
        return self.init.partition(":")[0]

    @property
    def init_arg(self) -> str:
        return self.init.partition(":")[2]


class InferenceParams(_Strict):
    """Sliding-window inference (validation, evaluation, prediction, pool scoring)."""

    tile_size: int = Field(default=256, ge=32)
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    batch_size: int = Field(default=8, ge=1, description="windows per forward pass")
    precision: PrecisionName = Field(default="auto", description=_PRECISION_HELP)
    device: str = Field(default="auto", pattern=_DEVICE_PATTERN, description=_DEVICE_HELP)
    channels_last: Switch = "auto"
    tta: Literal["off", "flips"] = Field(
        default="off",
        description="evaluate and predict: average each window's probabilities over its "
        "4 flips (4x the time; validation during training never does)",
    )

    @field_validator("tile_size")
    @classmethod
    def _mult32(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be a multiple of 32 (encoder downsampling), got {v}")
        return v


class EvaluateParams(_Strict):
    split: str = "test"
    out_dir: Path = Path("outputs/evaluate")
    overlays: int = Field(default=3, ge=0)
    checkpoint: Literal["best", "last"] = "best"


class PredictParams(_Strict):
    input_dir: Path = Path("data/predict")
    out_dir: Path = Path("outputs/predictions")
    source: Literal["champion", "checkpoint"] = Field(
        default="champion",
        description="champion: the registry's champion version; checkpoint: train.out_dir",
    )
    models_cache: Path = Path("outputs/models")
    data_bar: Literal["auto", "none"] | Annotated[int, Field(ge=0)] = Field(
        default="auto",
        description="the data bar of the images to segment: auto (the FEI tag, else "
        "detected per image), none, or a fixed number of rows; it is 'not sample' in "
        "the masks and outside the class fractions",
    )
    pixel_size_nm: float | None = Field(
        default=None,
        gt=0,
        description="pixel size of the images to segment in nm; null: from each file's "
        "tags or sidecar (unknown: no scale bar, quantities in pixels)",
    )


class QuantifyParams(_Strict):
    """``srpu quantify``: microstructure quantities of labelled or predicted masks."""

    source: Literal["labels", "predictions"] = Field(
        default="labels",
        description="labels: the index's masks in ``splits``; predictions: the class-index "
        "masks srpu predict wrote to predict.out_dir",
    )
    splits: list[str] = Field(default_factory=lambda: ["test"], min_length=1)
    out_dir: Path = Path("outputs/quantify")
    connectivity: Literal[4, 8] = Field(
        default=4,
        description="pixel neighbourhood of a particle and of a percolating path: 4 (edges "
        "only, the conservative choice for transport) or 8 (corners too)",
    )
    min_particle_px: int = Field(
        default=4, ge=1, description="particles smaller than this (noise) are not counted"
    )
    exclude_edge_particles: bool = Field(
        default=True,
        description="size distributions without particles cut by the image edge (their "
        "size is unknown); counts and fractions keep them",
    )
    tortuosity: bool = Field(default=True, description="solve for the tortuosity factor")
    tortuosity_max_px: int = Field(
        default=512,
        ge=32,
        description="images larger than this along an axis are solved on centred crops of "
        "this size (the solver's time grows with the square of the side)",
    )
    tortuosity_iter_limit: int = Field(default=20000, ge=100)
    histogram_bins: int = Field(default=30, ge=5)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)


class DemoParams(_Strict):
    out_dir: Path = Path("data/demo")
    datasets: list[str] = Field(default_factory=lambda: ["nmc_lpsc", "nca_llzo"], min_length=1)
    labeled_per_dataset: int = Field(default=6, ge=1)
    pool_per_dataset: int = Field(default=8, ge=0)
    predict_images: int = Field(default=2, ge=0)
    size: int = Field(default=256, ge=64)
    info_bar: int = Field(default=24, ge=0, description="height of the SEM data bar in px")


class OrchestrationParams(_Strict):
    """How Dagster runs the assets."""

    executor: Literal["in_process", "multiprocess"] = Field(
        default="in_process",
        description="in_process: one process, step after step (best on 2 cores: STACK_NOTES); "
        "multiprocess: steps in parallel processes (the scoring fan-out's sub-datasets)",
    )
    max_concurrent: int = Field(default=2, ge=1, description="multiprocess: processes at once")


class TrackingParams(_Strict):
    """MLflow tracking and model registry. The URI: ``uri`` when set, else the environment's
    MLFLOW_TRACKING_URI, else a SQLite file in the project (no server needed)."""

    enabled: bool = True
    uri: str | None = None
    default_db: Path = Path("mlruns/mlflow.db")
    artifact_root: Path = Field(
        default=Path("mlruns/artifacts"), description="artifact folder for the SQLite default"
    )
    experiment: str = Field(default="srpu", min_length=1)
    registered_model: str = Field(default="srpu-segmenter", min_length=1)
    keep_run_checkpoints: int | None = Field(
        default=5,
        ge=1,
        description="per training stage, the checkpoints (run artifact 'checkpoint/') of "
        "this many newest runs are kept; older runs' are deleted after each training, "
        "except runs with a registered model version (never deleted); null keeps all",
    )


class EnsembleParams(_Strict):
    """How several predictions of one image are made, for the ``variance`` strategies."""

    method: Literal["tta", "mc_dropout", "none"] = Field(
        default="tta",
        description="tta: flips and 90-degree turns; mc_dropout: dropout on the encoder's "
        "features at inference; none: one prediction (no variance strategies)",
    )
    members: int = Field(default=4, ge=1, le=8, description="predictions per image")
    dropout: float = Field(default=0.2, gt=0, lt=1, description="mc_dropout: drop probability")


class ActiveParams(_Strict):
    """Active learning: scoring the pool with the champion, selecting what a person labels
    next, the rounds and when they stop."""

    out_dir: Path = Path("outputs/active")
    unit: Literal["image", "tile"] = Field(
        default="image", description="what is selected and labelled: whole images or tiles"
    )
    tile_size: int = Field(default=256, ge=32, description="side of a selection tile in px")
    batch_size: int = Field(default=4, ge=1, description="items selected per round")
    strategy: str = Field(
        default="rare",
        description="the registered selection strategy (active_learning/strategies.py): "
        "random, one uncertainty score, weighted, coreset, kmeans, cold_start, typiclust, "
        "probcover, rare, auto",
    )
    scoring_fanout: Literal["none", "per_dataset"] = Field(
        default="none",
        description="per_dataset: pool scoring as one asset per sub-dataset "
        "(uncertainty_scores_<name>), each resumable, which a multiprocess executor can run "
        "in parallel (orchestration.executor); none: one asset (best on 2 cores)",
    )
    scoring_threads: int = Field(
        default=0, ge=0, description="torch threads while scoring (0 = the cores)"
    )
    cold_features: Literal["auto", "appearance", "mae"] = Field(
        default="auto",
        description="what a cold start (no champion yet) embeds each tile with: mae (the "
        "MAE encoder in pretrain.out_dir, srpu pretrain), appearance (intensity and "
        "gradient histograms), auto (the MAE encoder where one exists, else appearance)",
    )
    auto_uncertainty_after: int = Field(
        default=8,
        ge=0,
        description="strategy auto: typical picks (typiclust) until this many items are "
        "labelled and every class is in a label, then weighted uncertainty",
    )
    typical_neighbours: int = Field(
        default=20, ge=1, description="typiclust: neighbours in the typicality"
    )
    typiclust_max_clusters: int = Field(default=500, ge=2, description="typiclust: cluster cap")
    probcover_purity: float = Field(
        default=0.95, gt=0, le=1, description="probcover: share of pure balls that sets delta"
    )
    rare_floor: float = Field(
        default=0.001,
        gt=0,
        le=1,
        description="rare: the smallest labelled share a class's need is computed from (a "
        "class in no label needs 1 / rare_floor)",
    )
    rare_clusters: float = Field(
        default=4.0,
        ge=1.0,
        description="rare: k-means clusters per pick (rare_clusters x batch_size), one pick "
        "per cluster",
    )
    strategies: list[str] = Field(
        default_factory=lambda: [
            "entropy",
            "least_confidence",
            "margin",
            "variance",
            "boundary_entropy",
            "boundary_margin",
        ],
        min_length=1,
        description="uncertainty scores computed and stored per image and tile",
    )
    aggregation: Literal["mean", "topk", "class_balanced"] = Field(
        default="class_balanced", description="how pixel uncertainty becomes one number"
    )
    topk_fraction: float = Field(default=0.1, gt=0, le=1)
    boundary_width: int = Field(default=3, ge=1, le=64, description="px around phase boundaries")
    weights: dict[str, float] = Field(
        default_factory=lambda: {"entropy": 1.0, "boundary_margin": 1.0, "variance": 1.0},
        description="strategy -> weight of its rank-normalised score in the combined score",
    )
    diversity: Literal["none", "coreset", "kmeans"] = Field(
        default="coreset", description="spread the batch over encoder embeddings"
    )
    candidate_factor: float = Field(
        default=3.0,
        ge=1.0,
        description="diversity picks among the top candidate_factor x batch_size by score",
    )
    cold_start: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="auto: typical, diverse images (on the cold-start embeddings, "
        "active.cold_features) while there is no champion model",
    )
    ensemble: EnsembleParams = EnsembleParams()
    await_rounds: int = Field(
        default=3,
        ge=1,
        description="picks of the last N rounds still unlabelled are not offered again; "
        "older ones are",
    )
    min_new_masks: int = Field(
        default=2, ge=1, description="the sensor starts a round when this many new masks are in"
    )
    round_retries: int = Field(
        default=2,
        ge=0,
        description="a failed round is requested again this many times (each under a new "
        "run key), then waits for a person; its masks stay pending",
    )
    max_rounds: int = Field(default=20, ge=1)
    stop_min_gain: float = Field(
        default=0.005, ge=0, description="stop when validation mIoU gains less than this ..."
    )
    stop_patience: int = Field(default=2, ge=1, description="... for this many rounds in a row")

    @property
    def scores_labeled(self) -> bool:
        """Whether selection measures distances to what is labelled, so labelled images
        are scored too (for their embeddings)."""
        if self.strategy in ("coreset", "typiclust", "probcover", "rare", "auto"):
            return True
        return self.strategy == "weighted" and self.diversity == "coreset"

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        if v not in SELECTION_STRATEGIES:
            raise ValueError(
                f"unknown selection strategy {v!r}; valid: {', '.join(SELECTION_STRATEGIES)}"
            )
        return v

    @field_validator("strategies")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        valid = ", ".join(UNCERTAINTY_STRATEGIES)
        for s in v:
            if s not in UNCERTAINTY_STRATEGIES:
                raise ValueError(f"unknown uncertainty strategy {s!r}; valid: {valid}")
        if len(set(v)) != len(v):
            raise ValueError(f"strategies repeated: {v}")
        return v

    @model_validator(mode="after")
    def _weights(self) -> ActiveParams:
        unknown = sorted(set(self.weights) - set(self.strategies))
        if unknown:
            raise ValueError(
                f"weights name strategies that are not computed: {unknown}; add them to "
                f"active.strategies ({self.strategies})"
            )
        if any(w < 0 for w in self.weights.values()):
            raise ValueError("weights must be >= 0")
        if self.strategy in UNCERTAINTY_STRATEGIES and self.strategy not in self.strategies:
            raise ValueError(
                f"strategy {self.strategy!r} is a score that is not computed; add it to "
                f"active.strategies ({self.strategies})"
            )
        variance = [s for s in self.strategies if s.endswith("variance")]
        if variance and (self.ensemble.method == "none" or self.ensemble.members < 2):
            raise ValueError(
                f"strategies {variance} need an ensemble: ensemble.method tta or mc_dropout "
                "and ensemble.members >= 2"
            )
        return self


class Params(_Strict):
    seed: int = 0
    classes: list[ClassSpec] = Field(min_length=2)
    mask: MaskParams = MaskParams()
    data: DataParams
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    inference: InferenceParams = InferenceParams()
    evaluate: EvaluateParams = EvaluateParams()
    predict: PredictParams = PredictParams()
    quantify: QuantifyParams = QuantifyParams()
    demo: DemoParams = DemoParams()
    tracking: TrackingParams = TrackingParams()
    orchestration: OrchestrationParams = OrchestrationParams()
    pretrain: PretrainParams = PretrainParams()
    active: ActiveParams = ActiveParams()
    stages: list[StageSpec] = Field(
        default_factory=lambda: [StageSpec(name="train")],
        min_length=1,
        description="training stages in order; the last one is the model that is evaluated",
    )

    @model_validator(mode="after")
    def _stages(self) -> Params:
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stages: names must be unique, repeated: {dup}")
        if self.stages[0].init_kind == "previous":
            raise ValueError(f"stages.0 ({names[0]}): init: previous needs a stage before it")
        outs: dict[str, str] = {str(Path(self.pretrain.out_dir)): "pretrain.out_dir"}
        for i, st in enumerate(self.stages):
            tp = stage_train(self, st, where=f"stages.{i}.train")
            cw = tp.loss.class_weights if isinstance(tp.loss, LossParams) else None
            if isinstance(cw, list) and len(cw) != len(self.classes):
                raise ValueError(
                    f"stages.{i}.train.loss.class_weights needs {len(self.classes)} entries"
                )
            key = str(Path(tp.out_dir))
            if key in outs:
                raise ValueError(
                    f"stages.{i} ({st.name}): output folder {key} is also {outs[key]}'s"
                )
            outs[key] = f"stages.{i}.train.out_dir"
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"classes: names must be unique, got {names}")
        colors = [c.color for c in self.classes]
        if len(set(colors)) != len(colors):
            raise ValueError("classes: colours must be unique (they decode colour masks)")
        if self.mask.default_class is not None and self.mask.default_class not in names:
            raise ValueError(
                f"mask.default_class {self.mask.default_class!r} is not a class; valid: {names}"
            )
        if self.mask.ignore_color is not None and self.mask.ignore_color in colors:
            raise ValueError("mask.ignore_color equals a class colour")
        if self.mask.encoding == "grey":
            lv = self.mask.grey_levels
            if lv is None or len(lv) != len(names):
                raise ValueError(
                    f"mask.grey_levels needs one grey level per class ({len(names)}) "
                    "when mask.encoding is 'grey'"
                )
        cw = self.train.loss.class_weights if isinstance(self.train.loss, LossParams) else None
        if isinstance(cw, list) and len(cw) != len(names):
            raise ValueError(f"train.loss.class_weights needs {len(names)} entries (one per class)")
        if isinstance(self.train.loss, LossParams):
            bad = [c for c in self.train.loss.skeleton_classes if c not in names]
            if bad:
                raise ValueError(
                    f"train.loss.skeleton_classes: {bad} are not classes; valid: {names}"
                )
        return self

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def stage(self, name: str) -> StageSpec:
        for st in self.stages:
            if st.name == name:
                return st
        raise ValueError(f"no training stage {name!r}; stages: {[s.name for s in self.stages]}")

    def resolved(self) -> dict[str, Any]:
        """The parameters as plain JSON-able data (for logging with a run)."""
        return json.loads(self.model_dump_json())


class _Classes(_Strict):
    classes: list[ClassSpec]

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class StageSetup(_Classes):
    """The sections of params one supervised training stage reads: the core's training
    code gets this, never the whole tree (``train`` is the stage's merged section)."""

    seed: int
    mask: MaskParams
    model: ModelParams
    train: TrainParams
    inference: InferenceParams
    model_train: TrainParams | None = Field(
        default=None,
        description="the top-level train section model: auto is planned from (one model "
        "for every stage and the MAE encoder)",
    )
    rare_fraction: float = Field(default=0.05, gt=0, lt=1, description="data.split.rare_fraction")


class PretrainSetup(_Classes):
    """The sections of params MAE pretraining reads."""

    seed: int
    model: ModelParams
    pretrain: PretrainParams
    model_train: TrainParams | None = Field(
        default=None, description="the top-level train section model: auto is planned from"
    )


def stage_setup(params: Params, name: str | None = None) -> StageSetup:
    """The sections training stage ``name`` reads (None: the top-level ``train`` section
    as it is, as the benchmarks use it)."""
    tp = params.train if name is None else stage_train(params, params.stage(name))
    return StageSetup(
        seed=params.seed,
        classes=params.classes,
        mask=params.mask,
        model=params.model,
        train=tp,
        inference=params.inference,
        model_train=params.train if params.model.is_auto else None,
        rare_fraction=params.data.split.rare_fraction,
    )


def pretrain_setup(params: Params) -> PretrainSetup:
    return PretrainSetup(
        seed=params.seed,
        classes=params.classes,
        model=params.model,
        pretrain=params.pretrain,
        model_train=params.train if params.model.is_auto else None,
    )


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def stage_train(params: Params, stage: StageSpec, where: str = "train") -> TrainParams:
    """The top-level ``train`` section with ``stage.train`` merged over it; the default
    output folder is ``train.out_dir/<stage name>``. Bad keys raise naming ``where``."""
    base = params.train.model_dump(mode="json")
    base["out_dir"] = str(Path(params.train.out_dir) / stage.name)
    try:
        return TrainParams.model_validate(_merge(base, stage.train))
    except ValidationError as e:
        raise ValueError("; ".join(_error_lines(e, prefix=f"{where}."))) from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            try:
                node = node[int(p)]
            except (ValueError, IndexError) as e:
                raise ParamsError(f"override {dotted!r}: no list item {p!r}") from e
        else:
            if p not in node or node[p] is None:
                node[p] = {}
            node = node[p]
        if not isinstance(node, dict | list):  # a value (auto, a list item) has no keys
            here = ".".join(parts[: i + 1])
            raise ParamsError(
                f"override {dotted!r}: {here} is {node!r}, not a section; set it whole, "
                f"e.g. --set '{here}={{...}}'"
            )
    last = parts[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError) as e:
            raise ParamsError(f"override {dotted!r}: no list item {last!r}") from e
    else:
        node[last] = value


_KEY_PART = re.compile(r"^[a-z_][a-z0-9_]*$")


def _error_lines(err: ValidationError, prefix: str = "") -> list[str]:
    """One line per bad key. A key that takes a value or ``auto`` fails once per choice
    (pydantic tags each with the choice's type): those are joined into one line."""
    by_key: dict[str, list[str]] = {}
    for e in err.errors():
        parts = [str(p) for p in e["loc"] if isinstance(p, int) or _KEY_PART.match(str(p))]
        key = prefix + ".".join(parts) if parts else (prefix.rstrip(".") or "(top level)")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see params.yaml for the valid keys)"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif e["type"] == "literal_error" and msg == "Input should be 'auto'":
            msg = "or 'auto'"
        got = e.get("input")
        quiet = ("extra_forbidden", "missing", "value_error", "assertion_error")
        shown = "" if e["type"] in quiet else f" (got {got!r})"
        msgs = by_key.setdefault(key, [])
        if f"{msg}{shown}" not in msgs:
            msgs.append(f"{msg}{shown}")
    lines = []
    for key, msgs in by_key.items():
        if all(m.startswith("or 'auto'") for m in msgs) and any(
            k.startswith(key + ".") for k in by_key
        ):
            continue  # the value below it is what is wrong
        if len(msgs) > 1 and msgs[-1].startswith("or 'auto'"):
            got = msgs[-1][len("or 'auto'") :]
            msgs = [m.removesuffix(got) for m in msgs[:-1]]
            lines.append(f"{key}: {'; '.join(msgs)}, or 'auto'{got}")
        else:
            # a check across keys names its keys itself
            lines.append("; ".join(msgs) if key == "(top level)" else f"{key}: {'; '.join(msgs)}")
    return lines


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid parameters:"]
    lines += [f"  {ln}" for ln in _error_lines(err)]
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping; raise ParamsError naming each bad key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_format_errors(source, e)) from None


class _Yaml12Loader(yaml.SafeLoader):
    """YAML as params files mean it: only true/false are booleans (YAML 1.2, as DVC reads
    params.yaml). YAML 1.1 would turn ``compile: off`` into False, which no key takes."""


_Yaml12Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml(text: str) -> Any:
    """Parse params YAML (a file or a ``--set`` value) with YAML 1.2 booleans."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml, apply ``a.b.c=value`` overrides (YAML-typed values), validate.

    Relative data paths stay relative to the current directory (where the CLI runs).
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = read_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of keys")
    for ov in overrides or []:
        if "=" not in ov:
            raise ParamsError(f"override {ov!r}: expected KEY=VALUE, e.g. train.epochs=5")
        key, val = ov.split("=", 1)
        _set_dotted(raw, key.strip(), read_yaml(val))
    return parse_params(raw, str(path))
