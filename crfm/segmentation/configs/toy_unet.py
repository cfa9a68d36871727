# Tiny U-Net with a full-resolution decoder, for the demo's judge and downstream segmentors. The toy SegFormer
# (toy_segformer.py, the CRFM guide) predicts at 1/4 of its input, so at 64 px it cannot resolve 2-3 px roads
# or small buildings; this network predicts every pixel. Everything else (data, pipeline, losses, schedule)
# is the SegFormer config's.
_base_ = ["toy_segformer.py"]

model = dict(
    backbone=dict(
        _delete_=True,
        type="UNet",
        in_channels=3,
        base_channels=16,  # stage widths 16, 32, 64, 128
        num_stages=4,
        strides=(1, 1, 1, 1),
        enc_num_convs=(2, 2, 2, 2),
        dec_num_convs=(2, 2, 2),
        downsamples=(True, True, True),
        enc_dilations=(1, 1, 1, 1),
        dec_dilations=(1, 1, 1),
        norm_cfg={{_base_.norm_cfg}},
        upsample_cfg=dict(type="InterpConv"),
        init_cfg=None,
    ),
    decode_head=dict(
        _delete_=True,
        type="FCNHead",
        in_channels=16,
        in_index=3,  # the decoder's last, full-resolution output
        channels=16,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes={{_base_.num_classes}},
        norm_cfg={{_base_.norm_cfg}},
        align_corners=False,
        ignore_index=255,
        loss_decode={{_base_.model.decode_head.loss_decode}},
    ),
)
