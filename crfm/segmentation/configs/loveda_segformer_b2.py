# SegFormer-B2 on LoveDA (7 classes) in crfm's index layout, for one GPU: the config to start from for a real dataset.
#
#   python -m crfm.data.make_index data/loveda --images img --labels label --classes loveda \
#     --remap 0:255,1:0,2:1,3:2,4:3,5:4,6:5,7:6 --val_fraction 0.1
#   python scripts/train_segmentor.py --mmseg_config crfm/segmentation/configs/loveda_segformer_b2.py \
#     --data_root data/loveda --json_file train.jsonl --val_file val.jsonl --work_dir work_dirs/seg_real --device cuda
#
# make_index already maps LoveDA's 0 (no-data) to 255 and 1..7 to 0..6, so labels load with reduce_zero_label=False
# and class names come from the classes.json beside the index. scripts/train_segmentor.py overrides data_root, the
# index files, num_classes, and (when given) max_iters, batch size and seed; --img_size would replace the
# Resize/RandomResize scales below, so leave it out to keep LoveDA's. The model, pipeline and schedule follow mmseg's
# segformer_mit-b2 and LoveDA configs, with BN instead of SyncBN (one process has no process group).
#
# mmseg's own LoveDADataset instead (mmseg's tools/train.py; crfm's script reads only our index layout), with the
# folders mmseg's tools/dataset_converters/loveda.py writes:
#   dataset_type = "LoveDADataset"; data_root = "data/loveDA"
#   train_dataloader["dataset"] = dict(type=dataset_type, data_root=data_root, reduce_zero_label=True,
#       data_prefix=dict(img_path="img_dir/train", seg_map_path="ann_dir/train"), pipeline=train_pipeline)
#   (val: img_dir/val, ann_dir/val), LoadAnnotations(reduce_zero_label=True) in both pipelines, no custom_imports.
custom_imports = dict(imports=["crfm.segmentation.mmseg_ext"], allow_failed_imports=False)
default_scope = "mmseg"

num_classes = 7  # background, building, road, water, barren, forest, agriculture (crfm/data/classes/loveda.json)
crop_size = (512, 512)
dataset_type = "CRFMIndexDataset"
data_root = "data/loveda"  # --data_root
train_ann_file = "train.jsonl"  # --json_file (relative to data_root)
val_ann_file = "val.jsonl"  # --val_file

norm_cfg = dict(type="BN", requires_grad=True)
data_preprocessor = dict(
    type="SegDataPreProcessor",
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size,
)
model = dict(
    type="EncoderDecoder",
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type="MixVisionTransformer",
        in_channels=3,
        embed_dims=64,  # MiT-B2: stage widths 64, 128, 320, 512
        num_stages=4,
        num_layers=[3, 4, 6, 3],
        num_heads=[1, 2, 5, 8],
        patch_sizes=[7, 3, 3, 3],
        sr_ratios=[8, 4, 2, 1],
        out_indices=(0, 1, 2, 3),
        mlp_ratio=4,
        qkv_bias=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.1,
        # From scratch by default (crfm downloads nothing). For ImageNet-pretrained MiT-B2, fetch mmseg's
        # mit_b2_20220624-66e8bf70.pth once, elsewhere, and point at the local copy (never a URL):
        #   init_cfg=dict(type="Pretrained", checkpoint="checkpoints/mit_b2_20220624-66e8bf70.pth"),
        # crfm's script loads every checkpoint weights-only: tensors and plain containers load, pickled code fails.
        init_cfg=None,
    ),
    decode_head=dict(
        type="SegformerHead",
        in_channels=[64, 128, 320, 512],
        in_index=[0, 1, 2, 3],
        channels=256,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        ignore_index=255,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, avg_non_ignore=True),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="whole"),
)

# mmseg's LoveDA pipelines (1024 px tiles): random rescale 0.5-2x of 512 px, 512 px crops, flip, photometric jitter;
# whole 1024 px tiles at test time.
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),  # reduce_zero_label: the dataset's (False)
    dict(type="RandomResize", scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=0.75),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PhotoMetricDistortion"),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(1024, 1024), keep_ratio=True),
    dict(type="LoadAnnotations"),  # after Resize: IoU at the labels' own resolution
    dict(type="PackSegInputs"),
]
train_dataloader = dict(
    batch_size=8,  # one GPU; mmseg's LoveDA configs use 4 GPUs x 4
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file=train_ann_file, pipeline=train_pipeline),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file=val_ann_file, pipeline=test_pipeline),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="PerClassIoUMetric", iou_metrics=["mIoU"])  # mmseg's IoUMetric + each class's IoU
test_evaluator = val_evaluator

# SegFormer's schedule: AdamW 6e-5 (head x10), linear warm-up, then poly decay, over 40k iterations.
max_iters = 40000
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={"pos_block": dict(decay_mult=0.0), "norm": dict(decay_mult=0.0), "head": dict(lr_mult=10.0)}
    ),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=1500, end=max_iters, by_epoch=False),
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=4000)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=4000, max_keep_ckpts=2, save_last=True),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="SegVisualizationHook"),
)
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),
)
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(by_epoch=False)
log_level = "INFO"
load_from = None
resume = False
randomness = dict(seed=0)
