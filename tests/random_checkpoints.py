"""Pretraining checkpoints in the documented format (insloc/models/__init__.py) with random weights, for
the export and transfer tests: no trainer needed."""
import random

import numpy as np
import torch

from insloc.config import Config
from insloc.models import build_encoder


def randomize_batchnorm_statistics(encoder, generator):
    """Non-trivial running statistics and affine weights, so eval-mode features depend on all of them."""
    for module in encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
            module.weight.data.copy_(1.0 + 0.1 * torch.randn(c, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(c, generator=generator))
            module.num_batches_tracked.fill_(7)


def make_checkpoint(config: Config, seed=0, key_offset=1.0):
    """(checkpoint dict, query encoder). encoder_k = encoder_q + key_offset everywhere (floats), so a test
    can tell which encoder an export came from."""
    torch.manual_seed(seed)
    encoder_q = build_encoder(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        randomize_batchnorm_statistics(encoder_q, generator)
    model = {"encoder_q." + k: v.clone() for k, v in encoder_q.state_dict().items()}
    for k, v in encoder_q.state_dict().items():
        model["encoder_k." + k] = v + key_offset if v.is_floating_point() else v.clone()
    groups = encoder_q.num_groups
    model["queue"] = torch.nn.functional.normalize(torch.randn(groups, 64, config.dim), dim=2)
    model["queue_ptr"] = torch.zeros((), dtype=torch.long)
    ckpt = {"model": model, "optimizer": {"state": {}, "param_groups": []}, "scaler": None,
            "epoch": 3, "step_in_epoch": 0, "step": 120,
            "rng": {"torch": torch.get_rng_state(), "cuda": None, "numpy": np.random.get_state(),
                    "python": random.getstate(), "box_generator": [generator.get_state()]},
            "config": config.to_dict(), "world_size": 1}
    return ckpt, encoder_q


def write_checkpoint(path, config: Config, seed=0):
    """Writes a checkpoint to path; returns the query encoder (eval mode) it holds."""
    ckpt, encoder_q = make_checkpoint(config, seed)
    torch.save(ckpt, path)
    return encoder_q


R50_FPN = Config(method="insloc", arch="fpn", depth=50)  # the recipe's FPN: BatchNorm after each conv
R50_FPN_NO_NORM = Config(method="insloc", arch="fpn", depth=50, fpn_norm="none")  # fasterrcnn_resnet50_fpn's
R50_C4 = Config(method="insloc", arch="c4", depth=50)
R50_MOCO = Config(method="moco", depth=50)
R18_FPN_DEMO = Config(method="insloc", arch="fpn", depth=18, fpn_channels=64, head_fc_dim=256, fpn_norm="none")
