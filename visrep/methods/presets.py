"""Methods are presets: named fillings of the template's fields, nothing else.

Each preset sets views, heads, target branch, objective and optimiser defaults. The numbers follow
the paper and, for the CIFAR-scale defaults (32 px, batch 256), solo-learn's published CIFAR recipes
(da Costa et al. 2022, JMLR). Anything can be overridden in YAML or on the command line.
Adding a method = adding an entry here (and an objective if the loss is new); the loop never changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from visrep.registry import Registry

METHODS = Registry("method")


@dataclass
class MethodPreset:
    name: str
    paper: str
    config: dict = field(default_factory=dict)

    @property
    def description(self) -> str:
        return self.paper


def mlp(hidden: int, out: int, layers: int = 2, bn: bool = True, last_bn: bool = False, **kw) -> dict:
    return {"type": "mlp", "hidden_dim": hidden, "out_dim": out, "num_layers": layers, "bn": bn,
            "last_bn": last_bn, **kw}


def _add(name: str, paper: str, **config) -> None:
    METHODS.add(name, MethodPreset(name, paper, config))


_add("simclr", "SimCLR: Chen et al. 2020, A Simple Framework for Contrastive Learning of Visual Representations",
     # the official head (google-research/simclr model_util.projection_head): every layer batch-normalised, the
     # last without bias, ReLU or BN shift
     views={"policy": "simclr"}, projector=mlp(2048, 256, last_bn=True, last_bn_center=False), predictor=None,
     target={"branch": "none"},
     objective={"name": "ntxent", "params": {"temperature": 0.2}},
     optim={"name": "lars", "lr": 0.4, "weight_decay": 1e-5})

_add("moco_v2", "MoCo v2: Chen et al. 2020, Improved Baselines with Momentum Contrastive Learning",
     views={"policy": "simclr"}, projector=mlp(2048, 256, bn=False), predictor=None,
     target={"branch": "ema", "momentum": 0.99, "momentum_end": 1.0},
     objective={"name": "moco_queue", "params": {"temperature": 0.2, "queue_size": 65536, "out_dim": 256}},
     optim={"name": "sgd", "lr": 0.3, "weight_decay": 1e-4})

_add("moco_v3", "MoCo v3: Chen, Xie, He 2021, An Empirical Study of Training Self-Supervised Vision Transformers",
     views={"policy": "byol"}, projector=mlp(4096, 256, layers=3, last_bn=True, last_bn_affine=False),
     predictor=mlp(4096, 256, layers=2, last_bn=True, last_bn_affine=False),
     target={"branch": "ema", "momentum": 0.99, "momentum_end": 1.0},
     objective={"name": "infonce", "params": {"temperature": 0.2}},
     optim={"name": "lars", "lr": 0.3, "weight_decay": 1e-6})

_add("byol", "BYOL: Grill et al. 2020, Bootstrap Your Own Latent",
     views={"policy": "byol"}, projector=mlp(4096, 256), predictor=mlp(4096, 256),
     target={"branch": "ema", "momentum": 0.99, "momentum_end": 1.0},
     objective={"name": "byol", "params": {}},
     optim={"name": "lars", "lr": 1.0, "weight_decay": 1e-5})

_add("simsiam", "SimSiam: Chen & He 2021, Exploring Simple Siamese Representation Learning",
     views={"policy": "simclr"}, projector=mlp(2048, 2048, layers=3, last_bn=True), predictor=mlp(512, 2048),
     target={"branch": "stopgrad"},
     objective={"name": "simsiam", "params": {}},
     optim={"name": "sgd", "lr": 0.5, "weight_decay": 1e-5})

_add("barlow_twins", "Barlow Twins: Zbontar et al. 2021, Self-Supervised Learning via Redundancy Reduction",
     views={"policy": "byol"}, projector=mlp(2048, 2048, layers=3), predictor=None, target={"branch": "none"},
     objective={"name": "barlow_twins", "params": {"lambda_offdiag": 0.0051, "scale_loss": 0.1}},
     optim={"name": "lars", "lr": 0.3, "weight_decay": 1e-4})

_add("vicreg", "VICReg: Bardes, Ponce, LeCun 2022, Variance-Invariance-Covariance Regularization",
     views={"policy": "byol"}, projector=mlp(2048, 2048, layers=3), predictor=None, target={"branch": "none"},
     objective={"name": "vicreg", "params": {}},
     optim={"name": "lars", "lr": 0.3, "weight_decay": 1e-4})

_add("dino", "DINO: Caron et al. 2021, Emerging Properties in Self-Supervised Vision Transformers",
     views={"policy": "multicrop"},
     projector={"type": "dino", "hidden_dim": 2048, "bottleneck_dim": 256, "out_dim": 4096, "num_layers": 3},
     predictor=None, target={"branch": "ema", "momentum": 0.996, "momentum_end": 1.0},
     objective={"name": "dino", "params": {"out_dim": 4096, "student_temp": 0.1},
                "schedules": {"teacher_temp": {"start": 0.04, "end": 0.07, "warmup_epochs": 30}}},
     optim={"name": "lars", "lr": 0.3, "weight_decay": 1e-6, "clip_grad": 3.0})

_add("swav", "SwAV: Caron et al. 2020, Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
     views={"policy": "multicrop"},
     projector={"type": "swav", "hidden_dim": 2048, "out_dim": 128, "num_prototypes": 3000},
     predictor=None, target={"branch": "none"},
     objective={"name": "swav", "params": {"temperature": 0.1}},
     optim={"name": "lars", "lr": 0.6, "weight_decay": 1e-6})


# ------------------------------------------------------------------ masked image modelling
# One view of crop + flip, a mask generator, a decoder on the patch tokens and a pixel loss. The
# backbone is a ViT (patch 4 at 32 px by default; any vit_* or illama_* works).
_MIM_OPTIM = {"name": "adamw", "lr": 1.5e-4, "weight_decay": 0.05, "betas": [0.9, 0.95], "warmup_epochs": 10}
_MAE_DECODER = {"type": "mae", "dim": 512, "depth": 8, "heads": 16}

_add("mae", "MAE: He et al. 2022, Masked Autoencoders Are Scalable Vision Learners",
     views={"policy": "crop", "options": {"crop_scale": [0.2, 1.0]}},
     backbone={"name": "vit_tiny", "options": {"pos_embed": "sincos", "init": "mae"}},
     projector=None, predictor=None, target={"branch": "none"},
     masking={"name": "random", "ratio": 0.75, "mode": "drop"}, decoder=_MAE_DECODER,
     objective={"name": "reconstruction", "params": {"loss": "mse", "norm_pix": True}},
     optim=_MIM_OPTIM)

_add("simmim", "SimMIM: Xie et al. 2022, SimMIM: A Simple Framework for Masked Image Modeling",
     views={"policy": "crop", "options": {"crop_scale": [0.67, 1.0]}},
     backbone={"name": "vit_tiny", "options": {}},
     projector=None, predictor=None, target={"branch": "none"},
     masking={"name": "random", "ratio": 0.6, "mode": "token"}, decoder={"type": "linear"},
     objective={"name": "reconstruction", "params": {"loss": "l1", "norm_pix": False}},
     optim={"name": "adamw", "lr": 1e-4, "weight_decay": 0.05, "betas": [0.9, 0.999], "warmup_epochs": 10})

# HPM as its official code (Haochen-Wang409/HPM) has it: raw-pixel targets (norm_pix_loss off), the EMA teacher's
# momentum 0.999 -> 0.9999 linearly over the first 100 epochs (per epoch) then constant, a loss predictor that
# shares the reconstructor's input layers and predicts p·p·3 values per patch (averaged), the class token in
# both decoders, xavier init and LayerNorm eps 1e-6, α_t per epoch. Our earlier choices stay as options:
# objective.params.norm_pix=true, target.momentum_schedule=cosine, loss_predictor.share_input=false,
# loss_predictor.out_dim=1, masking.alpha_schedule=step.
_HPM_LOSS_PREDICTOR = {**_MAE_DECODER, "share_input": True}
_add("hpm", "HPM: Wang et al. 2023, Hard Patches Mining for Masked Image Modeling",
     views={"policy": "crop", "options": {"crop_scale": [0.2, 1.0]}},
     backbone={"name": "vit_tiny", "options": {"pos_embed": "sincos", "init": "mae"}},
     projector=None, predictor=None,
     target={"branch": "ema", "momentum": 0.999, "momentum_end": 0.9999, "momentum_schedule": "linear",
             "momentum_epochs": 100},
     masking={"name": "hard_patches", "ratio": 0.75, "mode": "drop", "alpha_end": 0.5},
     decoder=_MAE_DECODER, loss_predictor=_HPM_LOSS_PREDICTOR,
     objective={"name": "hpm", "params": {"loss": "mse", "norm_pix": False}},
     optim=_MIM_OPTIM)

_add("hpm_loss_pred_only", "HPM ablation 'loss prediction only': random masks + the loss predictor (Wang et al. 2023)",
     views={"policy": "crop", "options": {"crop_scale": [0.2, 1.0]}},
     backbone={"name": "vit_tiny", "options": {"pos_embed": "sincos", "init": "mae"}},
     projector=None, predictor=None, target={"branch": "none"},
     masking={"name": "random", "ratio": 0.75, "mode": "drop"},
     decoder=_MAE_DECODER, loss_predictor=_HPM_LOSS_PREDICTOR,
     objective={"name": "hpm", "params": {"loss": "mse", "norm_pix": False}},
     optim=_MIM_OPTIM)

# ------------------------------------------------------------------ supervised
_add("supervised", "Supervised: one crop+flip view, a linear classifier head (classifier.type=cosine|gcr swaps it) "
     "and cross-entropy with label smoothing (DeiT-style AdamW; mixing.* adds Mixup/CutMix)",
     views={"policy": "crop", "options": {"crop_scale": [0.25, 1.0]}},
     projector=None, classifier={"type": "linear"}, predictor=None, target={"branch": "none"},
     objective={"name": "cross_entropy", "params": {"label_smoothing": 0.1}},
     optim={"name": "adamw", "lr": 2.5e-4, "weight_decay": 0.05, "betas": [0.9, 0.999], "warmup_epochs": 5})

# GCR (Zhang et al., ICCV 2023): the same composition with Grassmann class subspaces (k = 8, γ = 25) and the
# ResNet recipe of the paper's ImageNet runs (SGD momentum 0.9, lr 0.1 at batch 256, weight decay 1e-4);
# the bases train by Riemannian SGD at the same batch-scaled lr schedule, with QR every 5 steps from the first
# (as the official code does).
_add("supervised_gcr", "Supervised with GCR heads: class subspaces (k 8, gamma 25) trained by Riemannian SGD beside SGD",
     views={"policy": "crop", "options": {"crop_scale": [0.08, 1.0]}},
     projector=None, classifier={"type": "gcr", "k": 8, "gamma": 25.0}, predictor=None, target={"branch": "none"},
     objective={"name": "cross_entropy", "params": {"label_smoothing": 0.1}},
     optim={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "warmup_epochs": 5,
            "manifold_lr": 0.1, "manifold_momentum": 0.9, "manifold_qr_every": 5})

# ------------------------------------------------------------------ multi-task faces
# Faceptor (Qin et al. 2024, official code lxq1000/Faceptor): one encoder, one decoder shared by every task (9
# post-norm layers, width 256, 8 heads, FFN 2048), each task a set of queries, a value head and a map head shared by
# the tasks of their output shape, Layer-Attention over the chosen encoder levels (stage 1: the last one). AdamW
# with weight decay 0.05 as the official runs (which start from FaRL weights at lr 5e-5; from scratch visrep uses
# the MIM presets' lr). Views: none (resize only), because crops and flips would move faces but not landmarks.
FACE_TASKS = ["utkface_age", "utkface_gender", "utkface_race", "mtfl_landmarks", "mtfl_smile", "mtfl_glasses",
              "mtfl_pose"]
_FACE_COMMON = dict(
    views={"policy": "none"}, backbone={"name": "vit_tiny", "options": {}},
    projector=None, predictor=None, classifier=None, target={"branch": "none"},
    tasks=FACE_TASKS, objective={"name": "faceptor", "params": {}},
    optim={"name": "adamw", "lr": 1.5e-4, "weight_decay": 0.05, "betas": [0.9, 0.999], "warmup_epochs": 1,
           "clip_grad": 5.0},
    monitor={"knn_every": 0, "rankme_every": 0, "online_probe": False})
_add("faceptor", "Faceptor: Qin et al. 2024, Faceptor: A Generalist Model for Face Perception",
     task_head={"type": "faceptor", "dim": 256, "depth": 9, "heads": 8, "ffn_dim": 2048, "levels": [-1]},
     **_FACE_COMMON)
_add("faceptor_naive", "Naive Faceptor (Qin et al. 2024): one head per task group on the shared encoder",
     task_head={"type": "naive", "dim": 256, "levels": [-1]}, **_FACE_COMMON)
