"""The published recipes, read from the upstream code, as data: benchmark -> method -> setting ->
(value, where upstream sets it). ``test_recipes.py`` compares the effective recipe of every pair
with this table. A value that holds for one task only is keyed ``<task>/<setting>``.

ZSCL = Thunderbeee/ZSCL (mtil/, cil/); MoE = JiazuoYu/MoE-Adapters4CL; CL-CLIP = yxding95/CL-CLIP;
RAIL = linghan1997/Regression-based-Analytic-Incremental-Learning.
ConDU = zhangzicong518/ConDU.
DIKI = lloongx/DIKI; DPW = YonseiML/dpw.
"""

from __future__ import annotations

MTIL_ORDER1 = ("aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "oxford_pet",
               "stanford_cars", "sun397")

# Every ZSCL MTIL script (mtil/scripts/*.sh) and mtil/src/args.py / finetune.py.
_ZSCL_MTIL = {
    "training.optimizer": ("adamw", "ZSCL mtil/src/models/finetune.py: torch.optim.AdamW"),
    "training.weight_decay": (0.0, "ZSCL mtil/src/args.py --wd 0.0"),
    "training.betas": ([0.9, 0.999], "ZSCL mtil/src/args.py --beta2 0.999"),
    "training.batch_size": (64, "ZSCL mtil/src/args.py --batch-size 64"),
    "training.steps": (1000, "ZSCL mtil/scripts/*.sh --iterations 1000"),
    "training.schedule": ("cosine", "ZSCL mtil/src/utils.py cosine_lr"),
    "training.warmup_steps": (100, "ZSCL mtil/src/args.py --warmup_length 100"),
    "training.train_logit_scale": (False, "ZSCL mtil/src/models/finetune.py: logit_scale excluded"),
    "training.grad_clip_norm": (None, "ZSCL mtil/src/models/finetune.py: no clipping"),
    "training.augment": ("zscl", "ZSCL mtil/clip/clip.py: RandomResizedCrop(scale=(0.9, 1))"),
    "training.parts": ("wm", "ZSCL mtil/scripts/*.sh --train-mode=whole"),
    "seed": (42, "ZSCL mtil/src/args.py --seed 42"),
    "method.label_smoothing": (0.2, "ZSCL mtil/scripts/*.sh --ls 0.2"),
    "training.lr": (1e-5, "ZSCL mtil/scripts/ZSCL.sh lr array"),
    "aircraft/training.lr": (5e-5, "ZSCL mtil/scripts/ZSCL.sh lr array"),
    "mnist/training.lr": (5e-5, "ZSCL mtil/scripts/ZSCL.sh lr array"),
    "teacher": ("previous", "ZSCL mtil/scripts/lwf.sh --ref-model <previous>.pth; --load <previous>"),
}
_ZSCL_MTIL_METHODS = {
    "ft": {},
    "lwf_zscl": {"alpha": (1.0, "ZSCL mtil/src/args.py: --image_loss/--text_loss weight 1"),
                 "method.temperature": (2.0, "ZSCL mtil/src/args.py --T 2.0"),
                 "method.transposed": (True, "ZSCL mtil/scripts/lwf.sh --text_loss")},
    "vr_lwf_zscl": {"alpha": (1.0, "ZSCL mtil/src/args.py: --image_loss/--text_loss weight 1"),
                    "method.temperature": (2.0, "ZSCL mtil/src/args.py --T 2.0")},
    "wise_ft": {"method.weight": (0.8, "ZSCL mtil/scripts/WiSE_finetune.sh --wise_ft_alpha 0.8")},
    "icarl": {"method.budget": (10000, "ZSCL mtil/src/args.py --memory_size 10000"),
              "teacher": ("pretrained", "ZSCL mtil/src/models/icarl.py: no --ref-model, the zero-shot CLIP"),
              "method.distillation_weight": (1.0, "ZSCL mtil/src/models/icarl.py: weight 1 per direction"),
              "method.temperature": (2.0, "ZSCL mtil/src/args.py --T 2.0")},
    "zscl": {"method.image_loss": (1.0, "ZSCL mtil/scripts/ZSCL.sh --image_loss"),
             "method.text_loss": (1.0, "ZSCL mtil/scripts/ZSCL.sh --text_loss"),
             "method.l2": (1.0, "ZSCL mtil/scripts/ZSCL.sh --l2 1"),
             "method.average_every": (100, "ZSCL mtil/scripts/ZSCL.sh --we --avg_freq 100"),
             "method.temperature": (2.0, "ZSCL mtil/src/args.py --T 2.0")},
}
# MoE mtil/scripts/train/train_full_shot_router11_experts22_1000iters.sh (lines 10-15, 54-98).
_MOE_MTIL_LR = dict(zip(MTIL_ORDER1, (5e-3, 1e-3, 5e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-4, 1e-3, 1e-3, 1e-3)))
_MOE_MTIL = {
    **{f"{task}/training.lr": (lr, "MoE train_full_shot_router11_experts22_1000iters.sh line 11")
       for task, lr in _MOE_MTIL_LR.items()},
    "training.steps": (1000, "MoE train_full_shot ... --iterations 1000"),
    "training.batch_size": (64, "MoE mtil/src/args.py --batch-size 64"),
    "training.warmup_steps": (100, "MoE mtil/src/args.py --warmup_length 100"),
    "training.schedule": ("cosine", "MoE mtil/src/models/finetune.py cosine_lr"),
    "training.optimizer": ("adamw", "MoE mtil/src/models/finetune.py AdamW"),
    "training.weight_decay": (0.0, "MoE mtil/src/args.py --wd 0.0"),
    "method.label_smoothing": (0.2, "MoE train_full_shot ... --ls 0.2"),
    "method.experts": (22, "MoE train_full_shot ... --experts_num 22"),
    "method.top_k": (2, "MoE mtil/src/args.py --topk 2"),
    "method.bottleneck": (64, "MoE mtil/clip/adapter.py Linear(d, 64)"),
    "method.frozen_per_task": (2, "MoE mtil/src/models/finetune.py torch.topk(choose_map, 2)"),
    "method.ddas": (True, "MoE mtil/scripts/test/Full_Shot_order1.sh --autorouter"),
    "method.ddas_threshold": (0.0655, "MoE train_full_shot ... threshold=(655e-4 ...) line 13"),
    "method.ddas_batch": (128, "MoE mtil/src/args.py --batch-size-eval 128"),
    "method.ddas_steps": (300, "MoE train_full_shot ... AE --iterations 300"),
    "method.ddas_reference": ("data/01_raw/tiny-imagenet-200/train", "MoE train_full_shot ... AE0 on TinyImagenet"),
    "method.router_per_task": (True, "MoE mtil/clip/model.py: one router per task"),
    "method.eval_noise": (False, "MoE mtil/clip/model.py: noise only with --is_train"),
    "seed": (42, "MoE mtil/src/args.py --seed 42"),
}

# DIKI configs/MTIL.yaml over DIKI/setup_cfg.py's defaults, DIKI/DIKI.py and DIKI/utils.py.
_DIKI_MTIL = {
    "training.optimizer": ("sgd", "DIKI configs/MTIL.yaml optim.name SGD; DIKI.py torch.optim.SGD"),
    "training.lr": (5.0, "DIKI configs/MTIL.yaml optim.lr 5.0"),
    "training.weight_decay": (0.0, "DIKI configs/MTIL.yaml optim.weight_decay 0"),
    "training.batch_size": (128, "DIKI configs/MTIL.yaml optim.batch_size 128"),
    "training.epochs": (10, "DIKI configs/MTIL.yaml optim.max_epoch 10"),
    "training.steps": (None, "DIKI DIKI.py: epochs, no iteration count"),
    "training.schedule": ("cosine", "DIKI configs/MTIL.yaml lr_scheduler cosine"),
    "training.warmup_steps": (0, "DIKI configs/MTIL.yaml warmup_epoch 0"),
    "training.final_lr_ratio": (1e-3, "DIKI DIKI/utils.py build_cosine_scheduler final_lr = lr * 1e-3"),
    "training.augment": ("none", "DIKI DIKI/utils.py get_transform: clip._transform for training too"),
    "training.grad_clip_norm": (None, "DIKI DIKI.py train_one_task: no clipping"),
    "method.label_smoothing": (0.0, "DIKI DIKI.py F.cross_entropy"),
    "method.depth": (8, "DIKI configs/MTIL.yaml prompt_depth_vision / _text 8"),
    "method.length": (8, "DIKI configs/MTIL.yaml n_ctx_vision / _text 8"),
    "method.batchwise": (True, "DIKI configs/MTIL.yaml batchwise_prompt True"),
    "method.vote_batch": (256, "DIKI DIKI.py get_dataloader: test batch 2 x 128"),
    "seed": (42, "DIKI configs/MTIL.yaml seed 42"),
}

# DPW configs/mtil.yaml over DPW/setup_cfg.py's defaults, DPW/DPW.py, DPW/utils.py, clip/attention.py.
_DPW_MTIL = {
    "training.optimizer": ("sgd", "DPW configs/mtil.yaml optim.name SGD; DPW.py torch.optim.SGD"),
    "training.lr": (1.25, "DPW configs/mtil.yaml optim.lr 1.25"),
    "training.weight_decay": (0.0, "DPW configs/mtil.yaml optim.weight_decay 0"),
    "training.batch_size": (32, "DPW configs/mtil.yaml optim.batch_size 32"),
    "training.epochs": (10, "DPW configs/mtil.yaml optim.max_epoch 10"),
    "training.steps": (None, "DPW DPW.py: epochs, no iteration count"),
    "training.schedule": ("cosine", "DPW configs/mtil.yaml lr_scheduler cosine"),
    "training.warmup_steps": (0, "DPW configs/mtil.yaml warmup_epoch 0"),
    "training.final_lr_ratio": (1e-3, "DPW DPW/utils.py build_cosine_scheduler final_lr = lr * 1e-3"),
    "training.augment": ("none", "DPW main.py get_transform: clip._transform for training too"),
    "training.grad_clip_norm": (None, "DPW DPW.py train_one_task: no clipping"),
    "method.label_smoothing": (0.0, "DPW DPW.py F.cross_entropy"),
    "method.depth": (12, "DPW configs/mtil.yaml prompt_depth_vision / _text 12"),
    "method.length": (8, "DPW configs/mtil.yaml n_ctx_vision / _text 8"),
    "method.bottleneck": (64, "DPW clip/attention.py Adapter(bottleneck=64)"),
    "method.adapter_basis": ("initial", "DPW clip/attention.py: Adapter built before the weights load"),
    "method.batchwise": (True, "DPW configs/mtil.yaml batchwise_prompt True"),
    "method.vote_batch": (256, "DPW DPW.py get_dataloader: test batch 256"),
}

# RAIL = linghan1997/Regression-based-Analytic-Incremental-Learning: configs/analytic_clip.yaml (X-TAIL,
# its only config), primal_RAIL.py, dual_RAIL.py, clip/clip.py.
_RAIL = {
    "method.variant": ("primal", "RAIL README: python primal_RAIL.py (its first command; dual_RAIL.py the other)"),
    "method.hidden_dim": (15000, "RAIL configs/analytic_clip.yaml hidden_dim: 15000"),
    "method.regularization": (0.1, "RAIL configs/analytic_clip.yaml regularization: 0.1"),
    "method.feature_expansion": (True, "RAIL configs/analytic_clip.yaml feature_expansion: 1"),
    "method.fusion_weight": (0.8, "RAIL configs/analytic_clip.yaml fusion_weight: 0.8"),
    "method.kernel_gamma": (0.1, "RAIL configs/analytic_clip.yaml gamma: 0.1"),
    "method.kernel_regularization": (0.001, "RAIL dual_RAIL.py kernel_ridge_regression(lamda=0.001)"),
    "method.projection_seed": (42, "RAIL configs/analytic_clip.yaml seed: 42"),
    "method.augmentation_time": (1, "RAIL configs/analytic_clip.yaml augmentation_time: 1"),
    "training.batch_size": (128, "RAIL configs/analytic_clip.yaml batch_size: 128"),
    "training.augment": ("zscl", "RAIL clip/clip.py _transform(is_train=True): RandomResizedCrop(scale=(0.9, 1))"),
}

# ConDU scripts/MTIL_FT.sh, scripts/MTIL_LoRA.sh, src/args.py, src/models/finetune.py.
_CONDU_MTIL = {
    "training.optimizer": ("adamw", "ConDU src/models/finetune.py torch.optim.AdamW"),
    "training.weight_decay": (0.0, "ConDU src/args.py --wd 0.0"),
    "training.betas": ([0.9, 0.999], "ConDU src/args.py --beta2 0.999"),
    "training.batch_size": (64, "ConDU src/args.py --batch-size 64"),
    "training.steps": (1000, "ConDU scripts/MTIL_*.sh --iterations 1000"),
    "training.schedule": ("cosine", "ConDU src/models/finetune.py utils.cosine_lr"),
    "training.warmup_steps": (100, "ConDU src/args.py --warmup_length 100"),
    "training.train_logit_scale": (False, "ConDU src/models/finetune.py: logit_scale excluded"),
    "training.parts": ("wm", "ConDU scripts/MTIL_*.sh --train-mode=whole"),
    "training.augment": ("zscl", "ConDU clip/clip.py: RandomResizedCrop(scale=(0.9, 1))"),
    "seed": (42, "ConDU src/args.py --seed 42"),
    "method.label_smoothing": (0.2, "ConDU scripts/MTIL_*.sh --ls 0.2"),
}
_CONDU_LORA_LR = dict(zip(MTIL_ORDER1, (1e-3, 5e-4, 2e-3, 2e-3, 1.5e-4, 1e-5, 2e-3, 1e-3, 1.5e-4, 2e-3, 1.5e-3)))
_LORA_MTIL = {
    **_CONDU_MTIL,
    **{f"{task}/training.lr": (lr, "ConDU scripts/MTIL_LoRA.sh line 7") for task, lr in _CONDU_LORA_LR.items()},
    "method.rank": (64, "ConDU clip/model_lora.py lora_rank=64"),
}
# ZSCL cil/configs/class/cifar100_*.yaml and cil/continual_clip/models.py (weights 5, T 2 hard-coded).
_ZSCL_CIFAR = {
    "training.optimizer": ("adamw", "ZSCL cil/continual_clip/models.py AdamW"),
    "training.lr": (7.1e-6, "ZSCL cil/configs/class/cifar100_*.yaml lr: 7.1e-6"),
    "training.weight_decay": (0.0, "ZSCL cil/configs/class/cifar100_*.yaml weight_decay: 0.0"),
    "training.batch_size": (64, "ZSCL cil/configs/class/cifar100_*.yaml batch_size: 64"),
    "training.epochs": (1, "ZSCL cil/continual_clip/models.py EPOCH = 1"),
    "training.warmup_steps": (30, "ZSCL cil/continual_clip/models.py cosine_lr(..., 30, ...)"),
    "training.schedule": ("cosine", "ZSCL cil/continual_clip/models.py cosine_lr"),
    "training.train_logit_scale": (False, "ZSCL cil/continual_clip/models.py: logit_scale excluded"),
    "method.label_smoothing": (0.2, "ZSCL cil/configs/class/cifar100_*.yaml ls: 0.2"),
    "teacher": ("previous", "ZSCL cil/continual_clip/models.py: a copy of the task's start model"),
}
_ZSCL_CIFAR_METHODS = {
    "ft": {},
    "vr_lwf_zscl": {"alpha": (5.0, "ZSCL cil/continual_clip/models.py: 5 * loss_ZSCL + 5 * loss_ZSCL_2")},
    "lwf_zscl": {"alpha": (5.0, "ZSCL cil/continual_clip/models.py: 5 * loss_ZSCL + 5 * loss_ZSCL_2")},
    "icarl": {"method.budget": (5000, "ZSCL cil/continual_clip/dynamic_dataset.py memory_size = 5000"),
              "method.distillation_weight": (5.0, "ZSCL cil/continual_clip/models.py: weight 5")},
    "zscl": {"method.image_loss": (5.0, "ZSCL cil/continual_clip/models.py: 5 * loss_ZSCL"),
             "method.text_loss": (5.0, "ZSCL cil/continual_clip/models.py: 5 * loss_ZSCL_2"),
             "method.l2": (0.0, "ZSCL cil/configs/class/cifar100_*.yaml l2: 0"),
             "method.average_every": (10, "ZSCL cil/configs/class/tinyimagenet_100-10-ZSCL.yaml avg_freq: 10")},
}


def _moe_cifar(batch: int) -> dict:
    """MoE cil/configs/class/cifar100_*-MoE-Adapters.yaml and cil/clip/model.py (hard-coded)."""
    return {
        "training.lr": (1e-3, "MoE cil/configs/class/cifar100_*-MoE-Adapters.yaml lr: 1e-3"),
        "training.batch_size": (batch, "MoE cil/configs/class/cifar100_*-MoE-Adapters.yaml batch_size"),
        "training.weight_decay": (0.0, "MoE cil/configs/class/cifar100_*-MoE-Adapters.yaml weight_decay: 0.0"),
        "training.epochs": (1, "MoE cil/continual_clip/models.py EPOCH = 1"),
        "training.warmup_steps": (30, "MoE cil/continual_clip/models.py cosine_lr(..., 30, ...)"),
        "method.label_smoothing": (0.0, "MoE cil/configs/class/cifar100_*-MoE-Adapters.yaml ls: 0.0"),
        "method.experts": (2, "MoE cil/clip/model.py experts_num = 2"),
        "method.top_k": (2, "MoE cil/clip/model.py top_k = 2"),
        "method.router_per_task": (False, "MoE cil/clip/model.py: one router, global_taskid 0"),
        "method.frozen_per_task": (0, "MoE issue #14: no frozen experts in CIL"),
        "method.ddas": (False, "MoE cil/: no DDAS in CIL"),
        "method.eval_noise": (True, "MoE cil/clip/model.py: the gate's is_train is fixed at construction"),
    }


# CL-CLIP main.py defaults and PAPER.md (the paper's settings).
_CL_CLIP = {
    "training.optimizer": ("adam", "CL-CLIP methods/*.py optim.Adam"),
    "training.lr": (1e-6, "CL-CLIP main.py --lr 1e-6"),
    "training.batch_size": (100, "CL-CLIP main.py --batch 100"),
    "training.epochs": (15, "CL-CLIP main.py --epochs 15"),
    "training.grad_clip_norm": (1.0, "CL-CLIP methods/*.py clip_grad_norm_(..., 1.0)"),
    "training.weight_decay": (0.0, "CL-CLIP methods/*.py: no weight decay"),
    "seed": (10, "CL-CLIP main.py --seed 10"),
    "method.label_smoothing": (0.0, "CL-CLIP methods/lwf.py nn.CrossEntropyLoss()"),
}
_CL_CLIP_MST = {**_CL_CLIP, "training.schedule": ("constant", "CL-CLIP methods/lwf.py: StepLR stepped only in ost")}
_CL_CLIP_OST = {**_CL_CLIP, "training.schedule": ("step", "CL-CLIP methods/lwf.py StepLR(10 epochs, 0.1)"),
                "training.lr_milestones": ([10.0], "CL-CLIP methods/lwf.py StepLR step_size 10 epochs")}
_CL_CLIP_METHODS = {
    "ft": {},
    "lwf": {"alpha": (0.5, "CL-CLIP main.py --alpha 0.5")},
    "vr_lwf": {"alpha": (0.5, "CL-CLIP main.py --alpha 0.5")},
}

UPSTREAM: dict[str, dict[str, dict[str, tuple]]] = {
    **{benchmark: {method: {**_ZSCL_MTIL, **own} for method, own in _ZSCL_MTIL_METHODS.items()}
       for benchmark in ("mtil_order1", "mtil_order2")},
    **{benchmark: {method: {**_ZSCL_CIFAR, **own} for method, own in _ZSCL_CIFAR_METHODS.items()}
       for benchmark in ("cifar100_10steps", "cifar100_20steps", "cifar100_50steps")},
    "coco_mst": {method: {**_CL_CLIP_MST, **own} for method, own in _CL_CLIP_METHODS.items()},
    "coco_ost": {method: {**_CL_CLIP_OST, **own} for method, own in _CL_CLIP_METHODS.items()},
    "eurosat_mst": {method: {**_CL_CLIP_MST, **own, **({"alpha": (2.0, "PAPER.md: EuroSAT, alpha 2 for the whole model")}
                                                        if "alpha" in own else {})}
                    for method, own in _CL_CLIP_METHODS.items()},
}
UPSTREAM["mtil_order1"]["moe_adapters"] = dict(_MOE_MTIL)
UPSTREAM["mtil_order1"]["diki"] = dict(_DIKI_MTIL)
UPSTREAM["mtil_order1"]["dpw"] = dict(_DPW_MTIL)
UPSTREAM["mtil_order2"]["diki"] = dict(_DIKI_MTIL)  # configs/MTIL-order-II.yaml: MTIL.yaml with MTIL_order_2 True
UPSTREAM["mtil_order2"]["moe_adapters"] = dict(_MOE_MTIL)  # no order-II script: the rates go with the dataset
UPSTREAM["mtil_order1"]["rail"] = dict(_RAIL)
UPSTREAM["mtil_order2"]["rail"] = dict(_RAIL)
UPSTREAM["mtil_order1"]["lora"] = dict(_LORA_MTIL)
_CONDU_FT_LR = dict(zip(MTIL_ORDER1, (5e-5, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 5e-5, 1e-5, 1e-5, 1e-5)))
UPSTREAM["mtil_order1"]["condu"] = {
    **_CONDU_MTIL,
    **{f"{task}/training.lr": (lr, "ConDU scripts/MTIL_FT.sh line 8") for task, lr in _CONDU_FT_LR.items()},
    "method.variant": ("full", "ConDU scripts/MTIL_FT.sh: no --lora"),
    "method.top_k": (4, "ConDU src/args.py --logits_num 4"),
    "method.task_agnostic": (False, "ConDU scripts/eval_MTIL_FT.sh: --task_agnostic for unseen datasets only"),
}
UPSTREAM["mtil_order1"]["condu_lora"] = {
    **_LORA_MTIL,
    "method.variant": ("lora", "ConDU scripts/MTIL_LoRA.sh --lora True"),
    "method.top_k": (4, "ConDU src/args.py --logits_num 4"),
    "method.task_agnostic": (False, "ConDU scripts/eval_MTIL_LoRA.sh: --task_agnostic for unseen datasets only"),
}  # no order-II script: the rates go with the dataset
UPSTREAM["cifar100_10steps"]["moe_adapters"] = _moe_cifar(128)
UPSTREAM["cifar100_20steps"]["moe_adapters"] = _moe_cifar(128)
UPSTREAM["cifar100_50steps"]["moe_adapters"] = _moe_cifar(64)

# Few-shot MTIL (conf/mtil_5shot): MoE mtil/scripts/train/train_few_shot_router11_experts22_1000iters.sh.
_MOE_5SHOT_LR = dict(zip(MTIL_ORDER1, (8e-3, 5e-4, 2e-4, 5e-3, 1e-3, 1e-3, 1e-2, 1e-4, 1e-2, 1e-2, 1e-2)))
UPSTREAM_5SHOT = {
    "moe_adapters": {
        **{f"{task}/training.lr": (lr, "MoE train_few_shot_router11_experts22_1000iters.sh line 11")
           for task, lr in _MOE_5SHOT_LR.items()},
        "training.steps": (500, "MoE train_few_shot ... --iterations 500"),
        "few_shot": (5, "MoE train_few_shot ... --few_shot=5"),
        "method.ddas_threshold": (0.06, "MoE mtil/scripts/test/Few_Shot_order1_test.sh threshold 600e-4"),
        "method.label_smoothing": (0.2, "MoE train_few_shot ... --ls 0.2"),
    },
}
# ConDU scripts/fewshot_MTIL_FT.sh and fewshot_MTIL_LoRA.sh (order I only).
_CONDU_5SHOT_FT_LR = dict(zip(MTIL_ORDER1, (5e-5, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 1e-5, 5e-5, 1e-5, 1e-5)))
_CONDU_5SHOT_LORA_LR = dict(zip(MTIL_ORDER1, (3e-3, 8e-4, 1.5e-3, 2e-3, 3e-4, 1e-5, 2e-3, 2.5e-3, 3e-4, 2e-3, 2e-3)))
for _method, _rates, _script in (("condu", _CONDU_5SHOT_FT_LR, "fewshot_MTIL_FT.sh"),
                                 ("condu_lora", _CONDU_5SHOT_LORA_LR, "fewshot_MTIL_LoRA.sh")):
    UPSTREAM_5SHOT[_method] = {
        **{f"{task}/training.lr": (lr, f"ConDU scripts/{_script} line 7") for task, lr in _rates.items()},
        "training.steps": (500, f"ConDU scripts/{_script} --iterations 500"),
        "few_shot": (5, f"ConDU scripts/{_script} --few_shot 5"),
        "method.label_smoothing": (0.2, f"ConDU scripts/{_script} --ls 0.2"),
    }

# X-TAIL (conf/base/parameters_xtail.yml): RAIL configs/analytic_clip.yaml trains every domain on 16
# shots per class with seed 42 and publishes no recipe for the iterative methods it compares, which
# keep their MTIL recipes.
_XTAIL = {"few_shot": (16, "RAIL configs/analytic_clip.yaml num_shots: 16"),
          "seed": (42, "RAIL configs/analytic_clip.yaml seed: 42")}
UPSTREAM["xtail"] = {
    "ft": {**_ZSCL_MTIL, **_XTAIL},
    "moe_adapters": {**{k: v for k, v in _MOE_MTIL.items() if not k.startswith("cifar100/")}, **_XTAIL},
}
