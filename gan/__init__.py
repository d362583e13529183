"""GCGAN (DIM paper): FastGAN with global-context skips, for minority-class image synthesis.

    >>> from gan import Generator, Discriminator, GanStep, ReconstructionLoss
    >>> g, d = Generator(image_size=256), Discriminator(image_size=256)
    >>> step = GanStep(g, d, ReconstructionLoss(), torch.device("cpu"))
    >>> losses = step.step(real_batch(uint8_images))

One concept per file: ``layers`` (SN convs, GLU, noise, init), ``gc_block`` (GCA, GCBlock),
``generator``, ``discriminator``, ``diffaug``, ``losses`` (hinge, reconstruction), ``ema``,
``train_step`` (one iteration, DDP-aware), ``sampling`` (images, grids), ``features`` (FID/KID
feature extractors), ``quality`` (FID, KID, nearest real neighbours).
"""
from gan.discriminator import Discriminator
from gan.ema import GeneratorEMA
from gan.generator import IMAGE_SIZES, Generator
from gan.losses import ReconstructionLoss
from gan.train_step import GanStep, real_batch

__all__ = ["Discriminator", "Generator", "GeneratorEMA", "GanStep", "IMAGE_SIZES", "ReconstructionLoss", "real_batch"]
