"""tumorseg: brain-tumour segmentation with a UNet-ResNet18, built to be tuned.

Modules, one concern each:

- ``config``     the one typed training configuration (``TrainConfig``)
- ``data``       the one entry point for data: ``DataOptions``, ``open_dataset``, ``load_dataset``,
                 the on-disk array cache, ``python -m tumorseg.data DIR``
- ``layouts``    detect coco / pairs / nnunet and list each split's samples
- ``coco``       the Kaggle COCO reader and polygon rasteriser
- ``imageio``    decode 8/16-bit, multi-channel images (percentile normalisation) and masks
- ``splits``     grouped (by case) carving of missing splits, ``splits.json``
- ``inspect_data`` the dataset report (sizes, labels, duplicates, trivial baselines)
- ``synthetic``  a small built-in dataset, in any layout
- ``transforms`` albumentations pipelines and the input normalisation
- ``model``      ``create_model`` (any smp arch + encoder; the recipe: UNet-ResNet18), name/stride checks, encoder weights, cost
- ``losses``     ``create_loss`` from smp's Dice / BCE / focal losses
- ``metrics``    per-image Dice/IoU and pooled pixel precision/recall/F1
- ``schedule``   ``WarmupThenPlateau``: linear warmup, then ReduceLROnPlateau on val loss
- ``inference``  model input, logits, the one threshold and the one evaluation precision
- ``checkpoint`` ``model.pt`` files and state copies (plain keys, also after ``torch.compile``)
- ``engine``     one training run: ``train_one_epoch``, ``evaluate``, ``train``
- ``train``      the ``python -m tumorseg.train`` command line
- ``predict``, ``visualize``  masks for new images, prediction overlays
- ``cli``        argparse helpers, flags generated from dataclass fields
"""

__version__ = "0.1.0"
