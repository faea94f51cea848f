"""dae: self-supervised pretraining, fine-tuning and evaluation of medical-imaging backbones on MONAI."""

__version__ = "0.1.0"
