"""The losses by their --loss name."""
from .pairwise import DCHLoss, DHNLoss, DPSHLoss, HashNetLoss, IDHNLoss
from .proxy import HHFLoss, HyP2Loss, ProxyAnchorLoss, ProxyLoss
from .target_codes import CSQLoss, OrthoHashLoss

LOSSES = {loss_class.name: loss_class for loss_class in (
    HyP2Loss, ProxyAnchorLoss, HHFLoss, DHNLoss, DPSHLoss, HashNetLoss, DCHLoss, CSQLoss, IDHNLoss, OrthoHashLoss)}

PROXY_LOSSES = [name for name, loss_class in LOSSES.items() if issubclass(loss_class, ProxyLoss)]


def tunable_hyperparameters(name):
    """{hyper-parameter: published default} of the loss `name` (zeta and seed come from the run)."""
    return {spec.name: spec.default for spec in LOSSES[name].HYPERPARAMETERS}
