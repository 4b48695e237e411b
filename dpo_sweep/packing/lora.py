"""Several LoRA adapters over one frozen base model, each row of a batch through its own adapter.

A pack of K trials holds one PEFT model with K adapters: the first trial's is PEFT's `default`,
the others are `lane1`, `lane2`, ... Each LoRA linear computes its frozen base layer once for
the whole batch, then each adapter's low-rank update on its own block of rows:

    x: (K * R, T, in)  ->  base(x) + cat_j( B_j(A_j(x[j*R:(j+1)*R])) * scaling_j )

PEFT's own mixed-adapter forward (`adapter_names=`) refuses training mode, so the routed forward
below replaces it on every LoRA linear; it reads the adapters of the current route from a
`Router`. Outside a route (and with the adapters disabled, the reference) PEFT's forward runs.
Adapter weights keep PEFT's names, so that one lane is an ordinary PEFT adapter on disk and in a
checkpoint (`LaneView`): a packed trial's checkpoint resumes alone and the other way round.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from omegaconf import DictConfig

Tensor = torch.Tensor
DEFAULT = "default"  # PEFT's name of the first adapter: the first lane's
# `...q_proj.lora_A.<adapter>.weight`: the adapter's name inside a state-dict key
_ADAPTER_KEY = re.compile(r"\.(lora_A|lora_B)\.([^.]+)\.")


def lane_name(j: int) -> str:
    return DEFAULT if j == 0 else f"lane{j}"


class Router:
    """Which adapter each block of rows goes through: `names[j]` takes the j-th of len(names)
    equal blocks of the batch. None: PEFT's own forward (its active adapter)."""

    def __init__(self) -> None:
        self.names: Optional[List[str]] = None

    @contextlib.contextmanager
    def route(self, names: Sequence[str]) -> Iterator[None]:
        before, self.names = self.names, list(names)
        try:
            yield
        finally:
            self.names = before


def _routed_forward(module: torch.nn.Module, router: Router):
    peft_forward = module.forward

    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        names = router.names
        if module.disable_adapters or module.merged:  # the reference: the base alone
            return peft_forward(x, *args, **kwargs)
        if names is None:
            raise RuntimeError("a packed model runs inside Router.route(): which adapter takes which rows")
        result = module.base_layer(x, *args, **kwargs)  # (K*R, ..., out): the frozen weights once
        if len(names) > 1 and _stackable(module, names):
            delta = _stacked_delta(module, names, x).reshape(result.shape)
        else:
            rows = x.shape[0] // len(names)
            deltas = []
            for j, name in enumerate(names):
                lora_a, lora_b = module.lora_A[name], module.lora_B[name]
                part = module._cast_input_dtype(x[j * rows : (j + 1) * rows], lora_a.weight.dtype)  # (R, ..., in)
                deltas.append(lora_b(lora_a(module.lora_dropout[name](part))) * module.scaling[name])  # (R, ..., out)
            delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=0)  # (K*R, ..., out)
        return (result + delta).to(result.dtype)

    return forward


def _stackable(module: torch.nn.Module, names: Sequence[str]) -> bool:
    """Whether the adapters `names` of a layer go through one batched product: the same rank and
    dtype, no dropout (packed trials have none: a lone run could not draw the same masks)."""
    weights = [module.lora_A[n].weight for n in names]
    return (len({(w.shape, w.dtype) for w in weights}) == 1
            and all(isinstance(module.lora_dropout[n], torch.nn.Identity) for n in names))


def _stacked_delta(module: torch.nn.Module, names: Sequence[str], x: Tensor) -> Tensor:
    """The K adapters' updates in two batched products (a few kernels whatever K is, where a
    loop would launch K times as many): x (K*R, ..., in) -> (K, R*..., out)."""
    K = len(names)
    a = torch.stack([module.lora_A[n].weight for n in names])  # (K, r, in)
    b = torch.stack([module.lora_B[n].weight for n in names])  # (K, out, r)
    xs = module._cast_input_dtype(x, a.dtype).reshape(K, -1, x.shape[-1])  # (K, R*..., in): lane j's rows
    delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))  # (K, R*..., out)
    scales = [module.scaling[n] for n in names]
    if len(set(scales)) == 1:
        return delta * scales[0]
    return delta * torch.tensor(scales, dtype=delta.dtype, device=delta.device)[:, None, None]


def lora_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def add_lanes(model, lora_cfgs: Sequence[DictConfig], seed: int) -> Router:
    """Give the PEFT model `model` (its `default` adapter made from lora_cfgs[0]) one adapter per
    further config, each initialised as a lone run with that config would be (the same seed, so
    the same draws), every adapter trainable; route its LoRA linears. Returns the router."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear

    first = model.peft_config[DEFAULT]
    for j, lora_cfg in enumerate(lora_cfgs[1:], start=1):
        config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                            target_modules=first.target_modules, task_type=first.task_type)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # as models.load_policy seeds a lone run's adapters
            model.add_adapter(lane_name(j), config)
    layers = lora_layers(model)
    other = [type(m).__name__ for m in layers if not isinstance(m, Linear)]
    if other:
        raise ValueError(f"packed trials route LoRA linear layers only; this model has LoRA on {sorted(set(other))}")
    router = Router()
    for m in layers:
        m.forward = _routed_forward(m, router)
    # Every adapter active, so trainable: PEFT sets requires_grad by the active adapters again
    # whenever they are switched back on (after each `disable_adapter()`, the reference's forward).
    model.base_model.set_adapter([lane_name(j) for j in range(len(lora_cfgs))])
    return router


def _adapter_of(key: str) -> Optional[str]:
    m = _ADAPTER_KEY.search(key)
    return m.group(2) if m else None


def lane_parameters(model: torch.nn.Module, names: Sequence[str]) -> List[torch.nn.Parameter]:
    """The adapter weights of the lanes `names`, in the model's parameter order (the order a lone
    run's optimizer sees them in)."""
    wanted = set(names)
    return [p for key, p in model.named_parameters() if _adapter_of(key) in wanted]


class LaneView:
    """One lane as a lone run's model for checkpoints: its state dict is the base weights and
    this lane's adapter under PEFT's `default` name, as a lone trial's would be."""

    def __init__(self, model: torch.nn.Module, name: str):
        self.model, self.name = model, name

    def _as_default(self, key: str) -> str:
        return _ADAPTER_KEY.sub(lambda m: f".{m.group(1)}.{DEFAULT}.", key)

    def state_dict(self) -> Dict[str, Tensor]:
        out = {}
        for key, value in self.model.state_dict().items():
            adapter = _adapter_of(key)
            if adapter is None or adapter == self.name:
                out[self._as_default(key)] = value
        return out

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        """This lane's adapter from a lone run's (or a lane's) state dict; the frozen base is
        the pack's own and stays as it is."""
        own = {self._as_default(k): k for k, _ in self.model.named_parameters() if _adapter_of(k) == self.name}
        missing = sorted(set(own) - set(state))
        if missing:
            raise KeyError(f"the checkpoint has no adapter weight {missing[0]} (a LoRA of other target modules?)")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for saved_key, key in own.items():
                params[key].copy_(state[saved_key])


def save_lane(model, name: str, tokenizer, path: str, merge: bool) -> None:
    """One lane saved as a lone LoRA run saves its model (models.save_model): the adapter in
    PEFT's format (it loads with PeftModel.from_pretrained as `default`), or with `merge` the
    base model with this adapter merged in."""
    if merge:
        merged = copy.deepcopy(model)
        for m in lora_layers(merged):
            m.__dict__.pop("forward", None)  # the routed forward still points at the original
        for other in [n for n in merged.peft_config if n != name]:
            merged.delete_adapter(other)
        merged.merge_and_unload(adapter_names=[name]).save_pretrained(path)
    else:
        model.save_pretrained(path, selected_adapters=[name])
        if name != DEFAULT:  # PEFT writes a non-default adapter into a subfolder of its name
            sub = os.path.join(path, name)
            for entry in os.listdir(sub):
                os.replace(os.path.join(sub, entry), os.path.join(path, entry))
            shutil.rmtree(sub)
    tokenizer.save_pretrained(path)
