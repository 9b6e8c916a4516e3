"""PipelineConfig: one pydantic model with a section per stage, and the resolved config as YAML or flat params.

Reading one (YAML files, overrides, merges) is config_loader.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Label = Literal["real", "ai"]
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub checks the sha256 prefix a file name carries
LABELS: tuple[str, ...] = ("real", "ai")


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SearchSource(_Section):
    """Keyword search through one of icrawler's engines; group = keyword."""

    engine: Literal["bing", "google", "baidu", "flickr"] = "bing"
    keywords: list[str] = Field(default_factory=list)
    keywords_file: Path | None = None
    label: Label = "real"
    max_num: int = Field(10, ge=1, le=1000)
    filters: dict[str, str] = Field(default_factory=dict)
    threads: int = Field(4, ge=1, le=32)
    endpoint: str | None = Field(
        None,
        description="bing, google, baidu: search-page URL template with {keyword} and {offset}; flickr: its REST API "
        "URL (default https://api.flickr.com/services/rest/). For mirrors and tests.",
    )
    api_key: str | None = Field(None, description="Flickr only.")
    fallback_engine: Literal["bing", "google", "baidu", "flickr"] | None = Field(
        None, description="Engine to retry keywords this engine returned nothing for (see health.fallback_sources)."
    )
    fallback_endpoint: str | None = Field(None, description="The fallback engine's endpoint (as endpoint).")

    @model_validator(mode="after")
    def _fallback_differs(self) -> SearchSource:
        if self.fallback_engine is not None and self.fallback_engine == self.engine:
            raise ValueError(f"fallback_engine must differ from engine ({self.engine!r})")
        if self.fallback_endpoint is not None and self.fallback_engine is None:
            raise ValueError("fallback_endpoint needs fallback_engine")
        if self.fallback_engine == "flickr" and not self.api_key:
            raise ValueError("fallback_engine 'flickr' needs api_key")
        return self


class UrlListSource(_Section):
    """A CSV of url,label,group fetched with icrawler's UrlListCrawler."""

    csv: Path
    threads: int = Field(4, ge=1, le=32)


class FolderSource(_Section):
    """Local images (how AI images arrive); group from sub-folder, pattern or CSV (file,group[,generator]).

    generator names the tool that made the images; a group CSV's optional generator column overrides it per file.
    """

    path: Path
    label: Label
    group_by: str = "folder"
    generator: str = "unknown"
    follow_symlinks: bool = Field(
        False,
        description="Follow symlinks that point inside the folder (others are always left out, with the reason): "
        "without it every symlink is left out as `symlink`, so that an import never reads outside its folder.",
    )

    @field_validator("group_by")
    @classmethod
    def _check_group_by(cls, value: str) -> str:
        if value.startswith("pattern:"):
            try:
                re.compile(value.removeprefix("pattern:"))
            except re.error as error:
                raise ValueError(f"invalid regular expression {value.removeprefix('pattern:')!r} ({error})") from None
        if value == "folder" or value.startswith(("pattern:", "csv:")):
            return value
        raise ValueError(f"must be 'folder', 'pattern:REGEX' or 'csv:FILE', got {value!r}")


class SourcesConfig(_Section):
    search: list[SearchSource] = Field(default_factory=list)
    urls: list[UrlListSource] = Field(default_factory=list)
    folders: list[FolderSource] = Field(default_factory=list)
    recrawl_after_hours: float = Field(
        20.0,
        ge=0,
        description="A keyword searched less than this many hours ago is not searched again (0: every crawl). "
        "Below 24 so that a daily schedule searches every keyword each day.",
    )
    request_timeout_s: float = Field(10.0, gt=0, description="Connect and read timeout of each request.")
    download_timeout_s: float = Field(
        60.0, gt=0, description="Total time one download may take: all its attempts, redirects and the body."
    )
    max_retries: int = Field(3, ge=0, le=10)
    allow_private_addresses: bool = False


class IngestConfig(_Section):
    min_side: int = Field(32, ge=1)
    max_pixels: int = Field(89_478_485, ge=1)
    animated: Literal["first_frame", "reject"] = "first_frame"


class DedupConfig(_Section):
    algorithm: Literal["phash", "dhash", "whash", "ahash"] = "phash"
    hash_size: int = Field(8, ge=4, le=32)
    threshold: int = Field(6, ge=0)

    @model_validator(mode="after")
    def _threshold_fits_hash(self) -> DedupConfig:
        bits = self.hash_size**2
        if self.threshold > bits:
            raise ValueError(f"dedup.threshold must be 0..{bits} for hash_size {self.hash_size}, got {self.threshold}")
        return self


class ReviewConfig(_Section):
    mode: Literal["auto", "assisted", "require", "off"] = Field(
        "auto",
        description="auto: approve everything; assisted: the model approves images below suspicion_threshold and "
        "the run waits for people on the rest; require: people decide every image; off: no gate.",
    )
    suspicion_threshold: float = Field(
        0.3, gt=0, le=1, description="assisted mode: images of the review queue below this suspicion are approved."
    )
    thumbnail_size: int = Field(160, ge=32, le=1024)
    timeout_hours: float = Field(72, gt=0, description="How long a paused/suspended run waits at the gate.")
    host: str = Field("127.0.0.1", description="Address of the review page (loopback by default).")
    port: int = Field(8765, ge=0, le=65535, description="Port of the review page (0: any free port).")
    tiny_side: int = Field(128, ge=1, description="Images with a shorter side below this are flagged as tiny.")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false


class SplitConfig(_Section):
    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    min_groups_per_label: int = Field(2, ge=1)
    leave_out_generator: str | None = Field(
        None,
        min_length=1,
        description="Leave-one-generator-out: that generator's AI images are only in test (a per-run view).",
    )

    @model_validator(mode="after")
    def _ratios_sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split.train + split.val + split.test must be 1.0, got {total:.4f}")
        return self


class AugmentConfig(_Section):
    rotation_degrees: float = Field(15.0, ge=0, le=180)
    hflip_p: float = Field(0.5, ge=0, le=1)
    autocontrast_p: float = Field(0.5, ge=0, le=1)
    affine_translate: float = Field(0.1, ge=0, le=0.5)
    affine_scale_min: float = Field(0.9, gt=0)
    affine_scale_max: float = Field(1.1, gt=0)
    blur_p: float = Field(0.0, ge=0, le=1, description="GaussianBlur probability (kernel 3 or 5, sigma 0.1..1.5).")
    jpeg_p: float = Field(0.0, ge=0, le=1, description="JPEG re-compression probability.")
    jpeg_quality_min: int = Field(60, ge=1, le=100)
    jpeg_quality_max: int = Field(95, ge=1, le=100)

    @model_validator(mode="after")
    def _jpeg_range(self) -> AugmentConfig:
        if self.jpeg_quality_min > self.jpeg_quality_max:
            raise ValueError(
                f"jpeg_quality_min ({self.jpeg_quality_min}) must be <= jpeg_quality_max ({self.jpeg_quality_max})"
            )
        return self


TORCHVISION_MODELS: tuple[str, ...] = ("resnet50", "resnet18", "efficientnet_b0", "convnext_tiny")
# Frozen-feature backbones of the `foundation` extra (learn/foundation.py): CLIP image encoders through open_clip,
# DINOv2 through timm.
FOUNDATION_MODELS: tuple[str, ...] = (
    "clip_vit_b16",
    "clip_vit_l14",
    "clip_vit_b16_laion",
    "clip_vit_l14_laion",
    "dinov2_vits14",
    "dinov2_vitb14",
    "dinov2_vitl14",
)
ModelName = Literal[TORCHVISION_MODELS + FOUNDATION_MODELS]  # type: ignore[valid-type]  # the names above


class ProbeConfig(_Section):
    """train.mode probe: the head trained on the cached features of the frozen backbone (AdamW, early stopping)."""

    head: Literal["linear", "mlp"] = Field(
        "linear", description="linear: one Linear layer (the linear probe); mlp: Linear, GELU, Dropout, Linear."
    )
    hidden: int = Field(256, ge=1, le=8192, description="mlp: width of the hidden layer.")
    dropout: float = Field(0.0, ge=0, lt=1, description="mlp: dropout before the last layer.")
    epochs: int = Field(100, ge=1, description="Passes over the training features at most.")
    patience: int = Field(10, ge=1, description="Stop after this many epochs without a lower validation loss.")
    lr: float = Field(0.001, gt=0)
    weight_decay: float = Field(0.0001, ge=0)
    batch_size: int = Field(256, ge=1)


class TrainConfig(_Section):
    model: ModelName = "resnet50"
    mode: Literal["auto", "probe", "finetune"] = Field(
        "auto",
        description="probe: frozen backbone, a head trained on cached features (train.probe); finetune: head first, "
        "then all layers (the recipe). auto: probe for the foundation backbones, finetune for torchvision ones.",
    )
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    weights: str = Field(
        "imagenet",
        description="'imagenet' or 'pretrained' (the published weights of train.model: ImageNet for torchvision "
        "backbones, CLIP or DINOv2 weights for the foundation ones), 'none' or a path to a state_dict file.",
    )
    weights_url: str | None = Field(
        None,
        description="Where the published weights are downloaded from (default: the publisher's URL for train.model); "
        "for mirrors and tests. Torchvision backbones: the file name must carry its sha256 prefix "
        "(name-<hex>.pth), which is checked; foundation backbones are checked against their pinned sha256.",
    )
    image_size: int = Field(224, ge=16, le=1024)
    batch_size: int = Field(64, ge=1)
    epochs: int = Field(30, ge=1)
    head_only_epochs: int = Field(5, ge=0)
    lr: float = Field(0.001, gt=0)
    backbone_lr: float | None = Field(None, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(5, ge=1)
    schedule: Literal["none", "cosine", "step"] = Field(
        "none", description="Learning-rate schedule over the whole run, stepped once per epoch."
    )
    step_size: int = Field(10, ge=1, description="schedule=step: multiply the lr by gamma every step_size epochs.")
    gamma: float = Field(0.1, gt=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, le=0.5)
    class_balance: Literal["none", "weighted", "undersample"] = Field(
        "weighted",
        description="none: the classes as they come; weighted: loss weighted by inverse class frequency; "
        "undersample: each epoch, a fresh random subset of the larger class as large as the smaller one.",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="DataLoader workers; auto: min(8, CPUs - 1) feeding a GPU, min(4, CPUs // 4) on a CPU."
    )
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs that have it, fp16 with a gradient scaler on other CUDA GPUs, fp32 "
        "on CPU and MPS."
    )
    augment_on: Literal["auto", "loader", "device"] = Field(
        "auto",
        description="Where training images are augmented: loader (the DataLoader workers), device (whole batches on "
        "the training device), auto (device on CUDA, else loader).",
    )
    compile: bool = Field(False, description="torch.compile the model on CUDA (ignored on CPU).")
    seed: int = 0

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @field_validator("weights_url")
    @classmethod
    def _check_weights_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https", "file"):
            raise ValueError(f"must be an http(s) or file URL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _torchvision_url_carries_hash(self) -> TrainConfig:
        # A foundation backbone's download is checked against its pinned sha256 (learn/foundation.py); a
        # torchvision one only against the prefix its file name carries, so that name must have one.
        url = self.weights_url
        if url is not None and self.model in TORCHVISION_MODELS:
            if not HASH_IN_NAME.search(posixpath.basename(urlsplit(url).path)):
                raise ValueError(
                    f"train.weights_url: the file name must carry its sha256 prefix (e.g. resnet50-11ad3fa6.pth) so "
                    f"that the download is hash-checked, got {url!r}"
                )
        return self

    @property
    def resolved_mode(self) -> str:
        """probe or finetune: mode, with auto resolved (probe for foundation backbones, finetune for the others)."""
        if self.mode != "auto":
            return self.mode
        return "probe" if self.model in FOUNDATION_MODELS else "finetune"

    @property
    def max_epochs(self) -> int:
        """The most epochs this run trains: probe.epochs in probe mode, epochs in finetune mode."""
        return self.probe.epochs if self.resolved_mode == "probe" else self.epochs


class EvaluateConfig(_Section):
    threshold: float = Field(0.5, gt=0, lt=1)
    bootstrap: int = Field(1000, ge=0)


class ReportConfig(_Section):
    cam_method: Literal["gradcam", "gradcam++", "eigencam", "scorecam"] = "gradcam"
    images_per_cell: int = Field(6, ge=1, le=100)
    cam_target: Literal["predicted", "ai", "real"] = Field(
        "predicted", description="The class the CAM maps explain: each image's predicted class, or always ai / real."
    )
    data_note: str = Field("", description="A warning about the data the report shows first (e.g. synthetic data).")


class AuditConfig(_Section):
    """Format-shortcut audit: a metadata-only model predicting the label on the training split."""

    enabled: bool = True
    warn_above: float = Field(0.8, ge=0.5, le=1, description="Warn when the metadata model's ROC-AUC exceeds this.")
    strict: bool = Field(False, description="Fail the run (instead of warning) above warn_above.")


class NormalizeConfig(_Section):
    """Re-encode every image of both classes the same way (decode, strip metadata, resize, JPEG)."""

    mode: Literal["none", "jpeg"] = "none"
    quality: int = Field(90, ge=1, le=100, description="Fixed JPEG quality (when quality_min/max are not set).")
    quality_min: int | None = Field(None, ge=1, le=100, description="Random quality per image in [min, max].")
    quality_max: int | None = Field(None, ge=1, le=100)
    resize_shorter: int | None = Field(None, ge=8, le=4096, description="Resize so the shorter side is this.")
    crop_square: bool = Field(False, description="Centre-crop to a square after resizing (removes aspect ratio).")

    @model_validator(mode="after")
    def _quality_range(self) -> NormalizeConfig:
        if (self.quality_min is None) != (self.quality_max is None):
            raise ValueError("preprocess.normalize.quality_min and quality_max must be set together")
        if self.quality_min is not None and self.quality_max is not None and self.quality_min > self.quality_max:
            raise ValueError(f"quality_min ({self.quality_min}) must be <= quality_max ({self.quality_max})")
        return self


class PreprocessConfig(_Section):
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)


class CalibrationConfig(_Section):
    """Temperature scaling on the validation split and the uncertain band of predict's verdict."""

    temperature_scaling: bool = True
    min_val_images: int = Field(
        30, ge=2, description="Fit a temperature only on at least this many validation images (else T = 1)."
    )
    uncertain_low: float = Field(0.35, gt=0, lt=1, description="p_ai <= this: verdict real.")
    uncertain_high: float = Field(0.65, gt=0, lt=1, description="p_ai >= this: verdict ai; between: uncertain.")

    @model_validator(mode="after")
    def _band(self) -> CalibrationConfig:
        if self.uncertain_low >= self.uncertain_high:
            raise ValueError(
                f"calibration.uncertain_low ({self.uncertain_low}) must be < uncertain_high ({self.uncertain_high})"
            )
        return self


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<workspace>/mlflow.db.")
    experiment: str = "aidetect"
    registered_model: str = "aidetect"
    system_metrics_interval_s: float = Field(5.0, ge=0, description="CPU/memory/GPU sampling; 0 disables.")
    trust_pickle: bool = Field(
        False, description="Unpickle registered models that carry no state_dict (runs code from the tracking store)."
    )


class ExecutionConfig(_Section):
    workspace: Path = Path("workspace")
    refresh_cache: bool = False
    reshuffle_splits: bool = Field(False, description="Start a new split registry version (CLI: --reshuffle).")
    crawl: bool = Field(True, description="false: start from the crawl log as it stands (the retrain deployment).")
    promote: bool = Field(
        False,
        description="Move the registry alias to this run's model even when it cannot be compared fairly with the "
        "current holder (CLI: --promote).",
    )
    task_runner: Literal["threads", "processes", "dask"] = Field(
        "threads", description="Where mapped per-image tasks run: a thread pool, a process pool, or Dask."
    )
    max_workers: int | None = Field(None, ge=1, description="Workers of the task runner (None: its default).")
    dask_address: str | None = Field(
        None, description="Scheduler address of an existing Dask cluster (None: a LocalCluster for the run)."
    )
    chunk_size: int = Field(256, ge=1, description="Images per mapped per-image task.")


class PipelineConfig(_Section):
    """The whole pipeline's settings; one section per stage."""

    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)


def config_to_yaml(config: PipelineConfig) -> str:
    """The resolved config as YAML (what gets logged next to a run)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def flatten_config(config: PipelineConfig) -> dict[str, str]:
    """Flat 'section.key' -> str mapping, for MLflow params."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), child)
        else:
            flat[prefix] = str(value)

    walk("", config.model_dump(mode="json"))
    return flat
