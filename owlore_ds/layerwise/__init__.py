"""Layer-sampled training (lisa, owlore) and GaLore under ZeRO: see optimizer.py."""

from owlore_ds.layerwise.optimizer import INACTIVE_POLICIES, GaloreSettings, LayerwiseOptimizer

__all__ = ["INACTIVE_POLICIES", "GaloreSettings", "LayerwiseOptimizer"]
