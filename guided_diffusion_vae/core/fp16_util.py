"""Mixed-precision training in the style of openai/guided-diffusion.

With ``use_fp16`` the model's trunk convolutions hold float16 weights, while
the optimiser updates float32 *master* copies. Master copies are kept as two
flat tensors (all vectors/scalars in one, all matrices/kernels in the other)
so that copying grads in and weights out is a couple of large kernels. The
loss is multiplied by ``2 ** lg_loss_scale`` before backward; a step whose
gradients overflow is skipped and the scale halved, otherwise the scale grows
slowly (dynamic loss scaling).

Without ``use_fp16`` (e.g. float32 weights under ``torch.autocast(bfloat16)``)
the trainer is a thin wrapper: ``optimize`` optionally measures the norms and
calls ``opt.step()``, with no host-device synchronisation.
"""

import logging

import torch
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

INITIAL_LOG_LOSS_SCALE = 20.0

_log = logging.getLogger(__name__)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ---------------------------------------------------------------------------
# Module conversion
# ---------------------------------------------------------------------------


def _cast_conv_params(module, dtype):
    # Replace .data rather than the Parameter objects so that references held
    # elsewhere (optimisers, master-parameter groups) keep pointing at them.
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)


def convert_module_to_f16(module):
    """Cast a convolution's weight and bias to float16 (other modules are left alone)."""
    _cast_conv_params(module, torch.float16)


def convert_module_to_f32(module):
    """Cast a convolution's weight and bias back to float32 (undoes ``convert_module_to_f16``)."""
    _cast_conv_params(module, torch.float32)


# ---------------------------------------------------------------------------
# Flat float32 master parameters
# ---------------------------------------------------------------------------


def get_param_groups_and_shapes(named_model_params) -> list:
    """Split named parameters into the two groups that get one flat master tensor each.

    :return: ``[(vector_params, -1), (matrix_params, (1, -1))]`` where each
        params list holds ``(name, param)`` pairs; the second item is the view
        shape of that group's master tensor.
    """
    named = list(named_model_params)
    vectors = [(name, p) for name, p in named if p.ndim <= 1]
    matrices = [(name, p) for name, p in named if p.ndim > 1]
    return [(vectors, -1), (matrices, (1, -1))]


def make_master_params(param_groups_and_shapes) -> list:
    """One float32 leaf Parameter per group, holding the group's values back to back."""
    masters = []
    for group, shape in param_groups_and_shapes:
        flat = _flatten_dense_tensors([p.detach().float() for _, p in group]).view(shape)
        master = nn.Parameter(flat)
        master.requires_grad = True
        masters.append(master)
    return masters


def param_grad_or_zeros(param):
    """The parameter's gradient, or zeros of its shape if backward did not reach it."""
    if param.grad is None:
        return torch.zeros_like(param)
    return param.grad.detach()


def model_grads_to_master_grads(param_groups_and_shapes, master_params) -> None:
    """Gather the model's (fp16) gradients into the flat float32 master gradients."""
    for master, (group, shape) in zip(master_params, param_groups_and_shapes):
        grads = [param_grad_or_zeros(p).float() for _, p in group]
        master.grad = _flatten_dense_tensors(grads).view(shape)


def unflatten_master_params(param_group, master_param) -> tuple:
    """Views of a flat master tensor shaped like each parameter of ``param_group``."""
    return _unflatten_dense_tensors(master_param, [p for _, p in param_group])


def master_params_to_model_params(param_groups_and_shapes, master_params) -> None:
    """Copy the master values back into the model's (possibly fp16) parameters."""
    for master, (group, _) in zip(master_params, param_groups_and_shapes):
        pieces = unflatten_master_params(group, master.view(-1))
        model_params = [p.detach() for _, p in group]
        if model_params:
            torch._foreach_copy_(model_params, list(pieces))


def master_params_to_state_dict(
    model, param_groups_and_shapes, master_params, use_fp16: bool
) -> dict:
    """The model's state_dict with parameter entries taken (in float32) from the masters."""
    state_dict = model.state_dict()
    if use_fp16:
        for master, (group, _) in zip(master_params, param_groups_and_shapes):
            pieces = unflatten_master_params(group, master.view(-1))
            for (name, _), value in zip(group, pieces):
                if name not in state_dict:
                    raise KeyError(f"parameter {name} missing from the model's state_dict")
                state_dict[name] = value
    else:
        for (name, _), master in zip(model.named_parameters(), master_params):
            state_dict[name] = master
    return state_dict


def state_dict_to_master_params(model, state_dict, use_fp16: bool) -> list:
    """Master parameters (flat float32 when ``use_fp16``) built from a state_dict."""
    named = [(name, state_dict[name]) for name, _ in model.named_parameters()]
    if use_fp16:
        return make_master_params(get_param_groups_and_shapes(named))
    return [value for _, value in named]


def zero_master_grads(master_params):
    """Drop the master gradients (they are rebuilt from the model every step)."""
    for master in master_params:
        master.grad = None


def zero_grad(model_params):
    """Zero existing gradients in place (one foreach kernel); missing ones stay None."""
    grads = [p.grad for p in model_params if p.grad is not None]
    if grads:
        for grad in grads:
            grad.detach_()
        torch._foreach_zero_(grads)


def check_overflow(value):
    """True if ``value`` (a float or a tensor) is +-inf or NaN."""
    if torch.is_tensor(value):
        return not bool(torch.isfinite(value).all())
    return value != value or value in (float("inf"), float("-inf"))


def _global_norm(tensors):
    """L2 norm over a list of tensors as a float32 0-dim tensor (no host sync)."""
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms))


# ---------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------


class MixedPrecisionTrainer:
    """Owns the master parameters and the loss scale; the optimiser is built on ``master_params``.

    Usage per step: ``zero_grad()``, ``backward(loss)``, ``optimize(opt)``.

    :param model: the network; with ``use_fp16`` it gets ``model.convert_to_fp16()``.
    :param use_fp16: fp16 weights + float32 masters + dynamic loss scaling.
    :param fp16_scale_growth: added to ``lg_loss_scale`` after each good step.
    :param initial_lg_loss_scale: starting log2 of the loss scale.
    :param log_fn: optional ``log_fn(key, value)`` (e.g. ``logger.logkv_mean``)
        receiving ``lg_loss_scale`` (float) and ``grad_norm`` / ``param_norm``
        (0-dim tensors, so logging does not force a device sync). Without it
        and without fp16, no norms are computed at all.
    """

    def __init__(
        self,
        *,
        model,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        initial_lg_loss_scale: float = INITIAL_LOG_LOSS_SCALE,
        log_fn=None,
    ):
        self.model = model
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = float(fp16_scale_growth)
        self.lg_loss_scale = float(initial_lg_loss_scale)
        self.log_fn = log_fn
        self.last_norms = {}

        self.model_params = list(model.parameters())
        if use_fp16:
            # Masters are taken while the weights are still float32, then the model is cast.
            groups = get_param_groups_and_shapes(model.named_parameters())
            self.param_groups_and_shapes = groups
            self.master_params = make_master_params(groups)
            model.convert_to_fp16()
        else:
            self.param_groups_and_shapes = None
            self.master_params = self.model_params

    def zero_grad(self):
        zero_grad(self.model_params)

    def backward(self, loss):
        """Backpropagate ``loss`` (scaled by ``2 ** lg_loss_scale`` under fp16)."""
        if self.use_fp16:
            loss = loss * (2.0**self.lg_loss_scale)
        loss.backward()

    def optimize(self, opt):
        """Apply one optimiser step; return False if it was skipped for overflow."""
        if self.use_fp16:
            return self._optimize_fp16(opt)
        return self._optimize_normal(opt)

    def _log(self, key, value):
        if self.log_fn is not None:
            self.log_fn(key, value)

    def _optimize_fp16(self, opt):
        groups, masters = self.param_groups_and_shapes, self.master_params
        self._log("lg_loss_scale", self.lg_loss_scale)
        model_grads_to_master_grads(groups, masters)
        grad_scale = 2.0**self.lg_loss_scale
        norms = self._measure_norms(grad_scale=grad_scale)
        # The one unavoidable sync: whether to take the step depends on the grads.
        if check_overflow(norms["grad_norm"]):
            self.lg_loss_scale -= 1.0
            _log.info("non-finite gradients; lg_loss_scale lowered to %s", self.lg_loss_scale)
            zero_master_grads(masters)
            return False

        for key, value in norms.items():
            self._log(key, value)
        torch._foreach_mul_([m.grad for m in masters], 1.0 / grad_scale)
        opt.step()
        zero_master_grads(masters)
        master_params_to_model_params(groups, masters)
        self.lg_loss_scale = self.lg_loss_scale + self.fp16_scale_growth
        return True

    def _optimize_normal(self, opt):
        if self.log_fn is not None:
            for key, value in self._measure_norms().items():
                self._log(key, value)
        opt.step()
        return True

    def _measure_norms(self, grad_scale=1.0):
        """``{"grad_norm": ||g|| / grad_scale, "param_norm": ||p||}`` as float32 0-dim tensors."""
        with torch.no_grad():
            params = [p.detach() for p in self.master_params]
            grads = [p.grad.detach() for p in self.master_params if p.grad is not None]
            self.last_norms = {
                "grad_norm": _global_norm(grads) / grad_scale,
                "param_norm": _global_norm(params),
            }
        return self.last_norms

    def master_params_to_state_dict(self, master_params) -> dict:
        """A model state_dict (float32 parameters) holding the values of ``master_params``."""
        groups = self.param_groups_and_shapes
        return master_params_to_state_dict(self.model, groups, master_params, use_fp16=self.use_fp16)

    def state_dict_to_master_params(self, state_dict) -> list:
        """Master parameters in this trainer's layout, built from a model state_dict."""
        return state_dict_to_master_params(self.model, state_dict, use_fp16=self.use_fp16)
