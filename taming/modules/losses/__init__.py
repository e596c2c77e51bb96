from taming.modules.losses.vqperceptual import (NLayerDiscriminator, PerceptualLoss, VQGANLoss,
                                                adaptive_disc_weight, hinge_d_loss)

__all__ = ["NLayerDiscriminator", "PerceptualLoss", "VQGANLoss", "adaptive_disc_weight", "hinge_d_loss"]
