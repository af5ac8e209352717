"""CoAtNet (Dai et al. 2021) in pure PyTorch: variants coatnet_0..7 plus small CPU ones.

    import coatnet
    model = coatnet.create_model("coatnet_0", num_classes=1000, img_size=224, drop_path_rate=0.2)
    params, macs = coatnet.count("coatnet_0", 224)
"""

from coatnet.adapt import adapt_state_dict, load_pretrained, resize_rel_pos_table
from coatnet.config import CoAtNetConfig
from coatnet.flops import count
from coatnet.model import CoAtNet
from coatnet.registry import DOCUMENTED_PARAMS, PAPER_FIGURES, create_model, get_config, list_models

__all__ = [
    "DOCUMENTED_PARAMS",
    "PAPER_FIGURES",
    "CoAtNet",
    "CoAtNetConfig",
    "adapt_state_dict",
    "count",
    "create_model",
    "get_config",
    "list_models",
    "load_pretrained",
    "resize_rel_pos_table",
]
