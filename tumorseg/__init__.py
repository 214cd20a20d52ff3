"""tumorseg: brain-tumour segmentation with a UNet-ResNet18, built to be tuned.

Modules, one concern each:

- ``config``     the one typed training configuration (``TrainConfig``)
- ``data``       COCO (Kaggle layout) reader, polygon rasteriser, on-disk array cache
- ``synthetic``  a small built-in dataset in the same layout
- ``transforms`` albumentations pipelines and the input normalisation
- ``model``      ``create_model`` (smp UNet-ResNet18) and encoder weights
- ``losses``     ``create_loss`` from smp's Dice / BCE / focal losses
- ``metrics``    per-image Dice/IoU and pooled pixel precision/recall/F1
- ``train``      one training run: ``train_one_epoch``, ``evaluate``, ``train``, ``main``
"""

__version__ = "0.1.0"
