# Tiny SegFormer (MiT encoder + all-MLP head) trained from scratch on crfm's toy dataset, sized for a 2-core CPU.
# Used as the frozen guidance segmentor in tests and demos; scripts/train_segmentor.py overrides data_root,
# ann files, max_iters, batch size, num_classes and img_size. No pretrained weights anywhere.
custom_imports = dict(imports=["crfm.segmentation.mmseg_ext"], allow_failed_imports=False)
default_scope = "mmseg"

num_classes = 6
img_size = (128, 128)
dataset_type = "CRFMIndexDataset"
data_root = "data/toy"  # --data_root
train_ann_file = "index.jsonl"  # --train_file (relative to data_root)
val_ann_file = "val.jsonl"  # --val_file

# BN, not SyncBN: single-process CPU training has no process group.
norm_cfg = dict(type="BN", requires_grad=True)
data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,  # LoadImageFromFile decodes BGR (cv2); the network sees RGB
    pad_val=0,
    seg_pad_val=255,
    size=img_size,
)
model = dict(
    type="EncoderDecoder",
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type="MixVisionTransformer",
        in_channels=3,
        embed_dims=16,  # stage widths 16, 32, 80, 128 (MiT-B0 is 32, 64, 160, 256)
        num_stages=4,
        num_layers=[1, 1, 1, 1],
        num_heads=[1, 2, 5, 8],
        patch_sizes=[7, 3, 3, 3],
        sr_ratios=[8, 4, 2, 1],
        out_indices=(0, 1, 2, 3),
        mlp_ratio=4,
        qkv_bias=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
        init_cfg=None,
    ),
    decode_head=dict(
        type="SegformerHead",
        in_channels=[16, 32, 80, 128],
        in_index=[0, 1, 2, 3],
        channels=64,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        ignore_index=255,
        # CE alone never predicts the rare, few-pixel buildings (0 IoU in our runs; mmseg's class_weight
        # path fails on 255 labels); Lovasz-softmax optimises per-class IoU and brings them in.
        loss_decode=[
            dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, avg_non_ignore=True),
            dict(type="LovaszLoss", loss_type="multi_class", classes="present", per_image=False, reduction="none"),
        ],
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="whole"),
)

# Remote-sensing scenes have no "up": flip both ways. Images are resized to a fixed square so batches stack.
# The toy sets are a few dozen small images: decoded and resized once per run (CachedCompose), flipped every draw.
train_pipeline = [
    dict(
        type="CachedCompose",
        transforms=[
            dict(type="LoadImageFromFile"),
            dict(type="LoadAnnotations"),  # reduce_zero_label: the dataset's (False; passing it is deprecated)
            dict(type="Resize", scale=img_size, keep_ratio=False),
        ],
    ),
    dict(type="RandomFlip", prob=0.5, direction="horizontal"),
    dict(type="RandomFlip", prob=0.5, direction="vertical"),
    dict(type="PackSegInputs"),
]
# Labels are loaded after Resize so IoU is computed at the original resolution (logits are resized back).
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=img_size, keep_ratio=False),
    dict(type="LoadAnnotations"),  # reduce_zero_label: the dataset's (False; passing it is deprecated)
    dict(type="PackSegInputs"),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=0,  # PNG decoding at 128 px is cheap; workers would only compete for the 2 cores
    persistent_workers=False,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file=train_ann_file, pipeline=train_pipeline),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file=val_ann_file, pipeline=test_pipeline),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="PerClassIoUMetric", iou_metrics=["mIoU"])  # IoUMetric + each class's IoU
test_evaluator = val_evaluator

# Schedule: AdamW with a short warm-up and poly decay to max_iters (the script keeps `end` in step).
max_iters = 1500
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=2e-3, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={"pos_block": dict(decay_mult=0.0), "norm": dict(decay_mult=0.0)}),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-3, by_epoch=False, begin=0, end=100),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=100, end=max_iters, by_epoch=False),
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    # Periodic checkpoints make runs resumable; save_last writes iter_<max_iters>.pth at the end.
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=500, max_keep_ckpts=1, save_last=True),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="SegVisualizationHook"),
)
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="gloo"),
)
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(by_epoch=False)
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=0)
