"""Model registry: build every classifier by name.

    >>> from models import create_model, list_models
    >>> net = create_model("adsr_resnet18", num_classes=5)

Every classifier has ``forward_features(x)`` (B x 3 x H x W -> B x D features) and
``forward_head(features)`` (B x D -> B x num_classes logits); ``forward`` is both.
"""
from models.registry import create_model, list_models, register_model

# Importing the model files registers their names (timm style); nothing else is exported.
from models import adsr_resnet, cabnet, lrf_cnn, resnet, se_resnet, srm_resnet  # noqa: F401, E402

__all__ = ["create_model", "list_models", "register_model"]
